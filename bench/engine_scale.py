"""The sequential engine on a random Llama with Llama-3-8B shapes: time and peak GPU memory.

    python bench/engine_scale.py --method awq,gptq --device cuda        # 8B shapes (GPU machine)
    python bench/engine_scale.py --layers 4 --method gptq               # fewer blocks, same shapes

The model (fp16, random weights, ~16 GB for 32 blocks) stays on the CPU; the engine moves one block
at a time to the device in fp32, so peak GPU memory is one block + its Hessians + one micro-batch,
far below the model's size. As klaq-export does, the engine drops each block's linear weights once
they are quantized (``keep_weights=False``), so the host holds the model once plus the codes and
the calibration activations; ``peak_rss_mb`` is reported next to the model's own size.
Calibration: random token ids, ``--n-calib`` x ``--seqlen``. The random
weights are drawn on the GPU when there is one (drawing 8B normals on the host takes minutes) and
the model is rebuilt for each method; ``build_s`` is reported apart from ``quant_s``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build_model(layers: int, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="gptq", help="one method or a comma-separated list")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--micro-batch", type=int, default=16)
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
