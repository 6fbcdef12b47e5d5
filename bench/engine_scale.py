"""The sequential engine on a random Llama with Llama-3-8B shapes: time and peak memory.

    python bench/engine_scale.py --method awq,gptq --device cuda        # 8B shapes (GPU machine)
    python bench/engine_scale.py --layers 4 --method gptq               # fewer blocks, same shapes
    python bench/engine_scale.py --lazy-cpu /tmp/klaq-lazy --method rtn,gptq --layers 32 --vocab 32000 \\
        --full-layers 4 --n-calib 8 --seqlen 128 --out bench/results/engine_lazy_cpu.jsonl

In memory (the first two): the model (fp16, random weights, ~16 GB for 32 blocks) stays on the
CPU; the engine moves one block at a time to the device in fp32, so peak GPU memory is one block +
its Hessians + one micro-batch, far below the model's size. As klaq-export does, the engine drops
each block's linear weights once they are quantized (``keep_weights=False``), so the host holds the
model once plus the codes and the calibration activations; ``peak_rss_mb`` is reported next to the
model's own size. The random weights are drawn on the GPU when there is one (drawing 8B normals on
the host takes minutes) and the model is rebuilt for each method; ``build_s`` is reported apart
from ``quant_s``.

From disk (``--lazy-cpu WORKDIR``): the random model is saved as sharded fp16 safetensors (~2 GB
files, as ``save_pretrained`` shards) under WORKDIR (reused when already there), then each method
quantizes it in a process of its own (so each peak RSS is that run's) on the CPU, loaded lazily
(:mod:`klaq.toolchain.lazy`: decoder blocks read from disk one at a time). ``--full-layers N``
also saves an N-block model and quantizes it both lazily and fully loaded (``from_pretrained``),
for the comparison at a size that fits twice in RAM. ``--clean`` deletes the saved models after.
Calibration everywhere: random token ids, ``--n-calib`` x ``--seqlen``, W4 g128 symmetric.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def llama8b_config(layers: int, vocab: int = 128256):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False)


def build_model(layers: int, device: str):
    from transformers import AutoModelForCausalLM

    cfg = llama8b_config(layers)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    model = model.to_empty(device="cpu")
    gen_dev = device if device.startswith("cuda") else "cpu"
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                for r0 in range(0, p.shape[0], 8192):  # bounded scratch on the device
                    rows = p[r0:r0 + 8192]
                    rows.copy_(torch.randn(rows.shape, device=gen_dev, dtype=torch.float16).mul_(0.02))
            else:
                p.fill_(1.0)
        model.model.rotary_emb.inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    return model.eval(), cfg


def save_random(out: Path, layers: int, vocab: int) -> None:
    """A random fp16 Llama-3-8B-shaped model as sharded safetensors + index, one tensor at a time
    (each from its own seeded generator), so host memory stays one ~2 GB shard."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    cfg = llama8b_config(layers, vocab)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    shards, size = [[]], 0
    for n, shape in shapes.items():  # in model order, ~2 GB per file (HF shards by size too)
        if size > 2e9:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += shape.numel() * 2
    weight_map = {}
    for si, names in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in names:
            g = torch.Generator().manual_seed(list(shapes).index(n))
            if len(shapes[n]) == 2:
                tensors[n] = torch.randn(shapes[n], generator=g, dtype=torch.float16).mul_(0.02)
            else:
                tensors[n] = torch.ones(shapes[n], dtype=torch.float16).add_(
                    torch.randn(shapes[n], generator=g, dtype=torch.float16).mul_(0.01))
            weight_map[n] = fname
        save_file(tensors, out / fname, metadata={"format": "pt"})
        print(f"saved {out / fname}", flush=True)
    total = sum(p.numel() * 2 for p in model.parameters())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    cfg.dtype = torch.float16
    cfg.save_pretrained(out)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def quantize_from_dir(args) -> dict:
    """One measurement (its own process): load ``--from-dir`` lazily or fully, quantize, report."""
    from transformers import AutoModelForCausalLM

    from klaq.toolchain.algorithms.grid import QuantSpec
    from klaq.toolchain.engine import EngineConfig, peak_rss_mb
    from klaq.toolchain.lazy import load_lazy
    from klaq.toolchain.quantize import quantize_model_ex

    d = Path(args.from_dir)
    t0 = time.perf_counter()
    if args.full_load:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float16).eval()
    else:
        model = load_lazy(str(d), torch.float16)
    load_s, rss_loaded = time.perf_counter() - t0, _rss_mb()
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())  # before keep_weights=False drops weights
    ids = torch.randint(0, cfg.vocab_size, (args.n_calib, args.seqlen), generator=torch.Generator().manual_seed(0))
    engine = EngineConfig(device="cpu", micro_batch=args.micro_batch, keep_weights=False, activations="cpu")
    t1 = time.perf_counter()
    q, res = quantize_model_ex(model, args.method, QuantSpec(4, 128, True), progress=True, calib_ids=ids,
                               engine=engine)
    quant_s = time.perf_counter() - t1
    disk = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    layers = res.layers if res is not None else {}
    return {"method": args.method, "load": "full" if args.full_load else "lazy", "layers": cfg.num_hidden_layers,
            "vocab": cfg.vocab_size, "params": n_params,
            "disk_gb": disk / 1e9, "n_calib": args.n_calib, "seqlen": args.seqlen, "load_s": load_s,
            "quant_s": quant_s, "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
            "codes_gb": sum(w.codes.nbytes for w in q.values()) / 1e9, "threads": torch.get_num_threads(),
            "mean_rel_err": sum(v.get("rel_err", 0) for v in layers.values()) / len(layers) if layers else None}


def lazy_cpu(args) -> None:
    """Save the model(s) once, then one process per (model, method, loading) measurement."""
    work = Path(args.lazy_cpu)
    runs = [(args.full_layers, "full"), (args.full_layers, "lazy")] if args.full_layers else []
    runs += [(args.layers, "lazy")] if (args.layers, "lazy") not in runs else []
    dirs = {}
    for layers in sorted({n for n, _ in runs}):
        dirs[layers] = work / f"llama8b-shapes-{layers}l-v{args.vocab}"
        if not (dirs[layers] / "config.json").exists():
            t0 = time.perf_counter()
            save_random(dirs[layers], layers, args.vocab)
            print(f"saved {layers} blocks in {time.perf_counter() - t0:.0f} s", flush=True)
    for method in args.method.split(","):
        for layers, load in runs:
            cmd = [sys.executable, __file__, "--from-dir", str(dirs[layers]), "--method", method, "--n-calib",
                   str(args.n_calib), "--seqlen", str(args.seqlen), "--micro-batch", str(args.micro_batch)]
            out = subprocess.run(cmd + (["--full-load"] if load == "full" else []), check=True, text=True,
                                 stdout=subprocess.PIPE).stdout
            line = out.strip().splitlines()[-1]
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    if args.clean:
        for d in dirs.values():
            shutil.rmtree(d)


def in_memory(args) -> None:
    from klaq.toolchain.algorithms.grid import QuantSpec
    from klaq.toolchain.engine import EngineConfig, quantize_blocks

    for method in args.method.split(","):
        t0 = time.perf_counter()
        model, cfg = build_model(args.layers, args.device)
        n_params = sum(p.numel() for p in model.parameters())
        build = time.perf_counter() - t0
        print(f"{method}: built {n_params / 1e9:.2f} B params in {build:.1f} s", flush=True)
        ids = torch.randint(0, cfg.vocab_size, (args.n_calib, args.seqlen), generator=torch.Generator().manual_seed(0))
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        res = quantize_blocks(model, ids, EngineConfig(method=method, spec=QuantSpec(4, 128, True), device=args.device,
                                                       micro_batch=args.micro_batch, progress=True,
                                                       keep_weights=False))
        out = {"method": method, "layers": args.layers, "params": n_params, "model_gb_fp16": n_params * 2 / 1e9,
               "build_s": build, "quant_s": res.seconds, "peak_gpu_mb": res.peak_gpu_mb,
               "peak_rss_mb": res.peak_rss_mb,
               "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "mean_rel_err": sum(v.get("rel_err", 0) for v in res.layers.values()) / len(res.layers)}
        print(json.dumps(out), flush=True)
        del model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="gptq", help="one method or a comma-separated list")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--lazy-cpu", metavar="WORKDIR", help="save the model to WORKDIR, quantize it from disk on the CPU")
    ap.add_argument("--vocab", type=int, default=128256, help="--lazy-cpu: vocabulary size")
    ap.add_argument("--full-layers", type=int, default=0, help="--lazy-cpu: also this many blocks, lazy and full")
    ap.add_argument("--out", help="--lazy-cpu: append the JSON lines here")
    ap.add_argument("--clean", action="store_true", help="--lazy-cpu: delete the saved models at the end")
    ap.add_argument("--from-dir", help=argparse.SUPPRESS)  # one --lazy-cpu measurement
    ap.add_argument("--full-load", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.from_dir:
        print(json.dumps(quantize_from_dir(args)), flush=True)
    elif args.lazy_cpu:
        lazy_cpu(args)
    else:
        in_memory(args)


if __name__ == "__main__":
    main()
