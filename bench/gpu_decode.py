"""Batch-1 GPU decode of an int4 package: klaq's torch backend (CUDA graph) vs transformers fp16.

By default the package is built here with **random weights of the real SmolLM2-135M shapes**
(hidden 576, 30 layers, 9 heads / 3 KV heads, ffn 1536, vocab 49152, tied head), decoder linears
quantized W4 g64 symmetric with RTN (Q4_0 blocks), embedding/head fp16, as klaq-export writes it;
``--package`` runs a real one instead. One run measures:

* klaq torch backend, Triton kernels + fused ops, decode step in a CUDA graph: tokens/s over
  ``--new-tokens`` greedy tokens (device-side loop), the generate()-style host loop (numpy logits
  every step), achieved GB/s (weights + KV bytes read per step / step time) and its fraction of the
  target's bandwidth, and decode time split into matmuls vs the rest (graph of the matmuls alone);
* the same with programmatic dependent launch switched the other way (kernels/pdl.py: each kernel
  may launch while the one before still runs; on by default on Hopper, ``KLAQ_PDL=0`` off), for the
  A/B (bench/pdl_decode_check.py compares the two from one prefilled cache: here each run prefills
  its own, and split-K's fp32 atomic adds may change the prefill's last bits);
* the same with ``--backend torch`` kernels (dequantize + cuBLAS, plain torch ops: the Jetson path);
* transformers' fp16 ``generate`` on a random-init LlamaForCausalLM of the same shapes;
* greedy tokens of the CUDA path vs the numpy runtime for ``--check-tokens`` tokens, plus a
  teacher-forced per-step argmax agreement.

    python bench/gpu_decode.py --json $OUT/gpu_decode.json --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import numpy as np
import torch

SHAPES = dict(hidden=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn=1536, vocab=49152, head_dim=64)


def build_random_package(path: str, group_size: int = 64, seed: int = 0, std: float = 0.02) -> float:
    from klaq.formats.gguf_package import HParams, Package, write_package
    from klaq.formats.tokenizer import TokenizerFacts
    from klaq.toolchain.algorithms.grid import QuantSpec
    from klaq.toolchain.algorithms.rtn import rtn

    t0 = time.perf_counter()
    s = SHAPES
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    spec = QuantSpec(bits=4, group_size=group_size, sym=True)
    hd, h, kv = s["head_dim"], s["n_heads"], s["n_kv_heads"]
    shapes = {"self_attn.q_proj": (h * hd, s["hidden"]), "self_attn.k_proj": (kv * hd, s["hidden"]),
              "self_attn.v_proj": (kv * hd, s["hidden"]), "self_attn.o_proj": (s["hidden"], h * hd),
              "mlp.gate_proj": (s["ffn"], s["hidden"]), "mlp.up_proj": (s["ffn"], s["hidden"]),
              "mlp.down_proj": (s["hidden"], s["ffn"])}
    tensors: dict = {"model.embed_tokens.weight": (torch.randn(s["vocab"], s["hidden"], generator=g, device=dev)
                                                   * std).cpu().numpy(),
                     "model.norm.weight": np.ones(s["hidden"], dtype=np.float32)}
    for i in range(s["n_layers"]):
        p = f"model.layers.{i}."
        for name, shape in shapes.items():
            w = torch.randn(*shape, generator=g, device=dev) * std
            tensors[f"{p}{name}.weight"] = rtn(w, spec)
        tensors[f"{p}input_layernorm.weight"] = np.ones(s["hidden"], dtype=np.float32)
        tensors[f"{p}post_attention_layernorm.weight"] = np.ones(s["hidden"], dtype=np.float32)
    hp = HParams(arch="llama", n_layers=s["n_layers"], hidden=s["hidden"], ffn=s["ffn"], n_heads=h, n_kv_heads=kv,
                 head_dim=hd, rope_theta=100000.0, rms_eps=1e-5, context_length=8192, vocab_size=s["vocab"])
    tok = TokenizerFacts(model="gpt2", tokens=[f"<t{i}>" for i in range(s["vocab"])], token_types=[1] * s["vocab"],
                         bos_id=0, eos_id=0)
    meta = {"method": "rtn", "bits": 4, "group_size": group_size, "sym": True, "source": "random-smollm2-shapes"}
    write_package(Package("llama", hp, tensors, tok, meta, name="random weights, SmolLM2-135M shapes"), path)
    return time.perf_counter() - t0


def sync():
    torch.cuda.synchronize()


SWEEP = [  # (M = 1 Triton matmul launch overrides, decode-attention keys per step)
    (None, 128), (None, 64), (dict(tiles=2), 128),
    # programmatic dependent launch (kernels/pdl.py) for the GEMVs alone (the fused ops follow KLAQ_PDL):
    # plain, with the L2 prefetch of each program's weight rows, with the next kernel let in after the loop,
    (dict(pdl=True), 128), (dict(pdl=True, prefetch=True), 128), (dict(pdl=True, pdl_late=True), 128),
    # and with each GEMV's first step of words loaded before its wait
    (dict(pdl=True, early=True), 128),
]


def sweep(pf, prompt: list[int], new: int) -> list[dict]:
    """Greedy tokens/s of the Triton path for each launch setting in SWEEP (one model, fresh caches)."""
    from klaq.runtime.torch_model import TorchDecoder

    model = TorchDecoder(pf, "cuda", backend="triton")
    out = []
    for cfg, bn in SWEEP:
        model.set_decode_config(cfg)
        model.attn_block_n = bn
        cache = model.new_cache(len(prompt) + new + 1)
        first = int(np.argmax(model.forward(prompt, cache)[-1]))
        try:
            model._graph(cache)
        except Exception as exc:  # a launch setting the kernels refuse
            out.append({"config": cfg, "attn_block_n": bn, "error": repr(exc)[:200]})
            continue
        sync()
        t0 = time.perf_counter()
        model.greedy_decode(first, new, cache)
        sync()
        out.append({"config": cfg, "attn_block_n": bn, "tok_s": new / (time.perf_counter() - t0)})
        print("sweep:", out[-1], flush=True)
    return out


def bench_klaq(pf, backend: str, prompt: list[int], new: int, bandwidth: float, decode_config="model",
               attn_block_n: int = 128) -> dict:
    from klaq.runtime.torch_model import TorchDecoder

    t0 = time.perf_counter()
    model = TorchDecoder(pf, "cuda", backend=backend)
    if decode_config != "model":  # "model": TorchDecoder's own default
        model.set_decode_config(decode_config)
    model.attn_block_n = attn_block_n
    sync()
    load_s = time.perf_counter() - t0
    r = {"backend": backend, "load_s": load_s, "decode_config": model.blocks[0].qkv.decode_config,
         "attn_block_n": attn_block_n}
    # device-side greedy loop
    cache = model.new_cache(len(prompt) + new + 128)
    t0 = time.perf_counter()
    logits = model.forward(prompt, cache)
    sync()
    r["prefill_s"] = time.perf_counter() - t0
    first = int(np.argmax(logits[-1]))
    t0 = time.perf_counter()
    model._graph(cache)
    sync()
    r["capture_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    toks = model.greedy_decode(first, new, cache)
    sync()
    dt = time.perf_counter() - t0
    r["tok_s"] = new / dt
    r["tokens"] = toks
    # generate()-style loop: numpy logits to the host every step
    cache2 = model.new_cache(len(prompt) + new + 1)
    tok = int(np.argmax(model.forward(prompt, cache2)[-1]))
    model.decode_step(tok, cache2)  # capture
    tok = 0
    sync()
    t0 = time.perf_counter()
    for _ in range(new - 1):
        tok = int(np.argmax(model.decode_step(tok, cache2)))
    r["host_loop_tok_s"] = (new - 1) / (time.perf_counter() - t0)
    split = model.decode_split(cache, iters=100)
    r.update(step_s=split.step_s, matmul_s=split.matmul_s, rest_s=split.rest_s,
             graph_tok_s=1.0 / split.step_s)
    ctx = len(prompt) + new // 2
    r["weight_bytes"] = model.weight_bytes_per_step()
    r["bytes_per_step"] = r["weight_bytes"] + model.kv_bytes_per_step(ctx)
    r["achieved_gbs"] = r["bytes_per_step"] * r["tok_s"] / 1e9
    r["bandwidth_fraction"] = r["achieved_gbs"] / bandwidth
    r["roofline_tok_s"] = bandwidth * 1e9 / r["bytes_per_step"]
    r["model"] = model
    return r


def bench_hf(prompt: list[int], new: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                      num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                      num_key_value_heads=s["n_kv_heads"], tie_word_embeddings=True, max_position_embeddings=8192,
                      rope_theta=100000.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).half().cuda().eval()
    ids = torch.tensor([prompt], device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
        sync()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        sync()
        dt = time.perf_counter() - t0
    n = out.shape[1] - len(prompt)
    import transformers

    return {"tok_s": n / dt, "new_tokens": int(n), "transformers": transformers.__version__}


def check_vs_numpy(pf, model, prompt: list[int], n: int) -> dict:
    from klaq.runtime.model import NumpyDecoder

    ref = NumpyDecoder(pf)
    cr = ref.new_cache(len(prompt) + n + 1)
    lr = ref.forward(prompt, cr)
    want, margins, tok = [], [], int(np.argmax(lr[-1]))
    first = tok
    for _ in range(n):
        lg = ref.forward([tok], cr)[-1]
        top = np.sort(lg)[-2:]
        margins.append(float(top[1] - top[0]))
        tok = int(np.argmax(lg))
        want.append(tok)
    ct = model.new_cache(len(prompt) + n + 1)
    lt = model.forward(prompt, ct)
    got = model.greedy_decode(int(np.argmax(lt[-1])), n, ct)
    # teacher forcing: the CUDA path fed the numpy tokens
    ct2 = model.new_cache(len(prompt) + n + 1)
    model.forward(prompt, ct2)
    agree, errs, tok = 0, [], first
    cr2 = ref.new_cache(len(prompt) + n + 1)
    ref.forward(prompt, cr2)
    for w in want:
        lt_ = model.decode_step(tok, ct2)
        lr_ = ref.forward([tok], cr2)[-1]
        errs.append(float(np.linalg.norm(lt_ - lr_) / np.linalg.norm(lr_)))
        agree += int(np.argmax(lt_)) == w
        tok = w
    diff = first_difference(got, want)
    return {"first_equal": int(np.argmax(lt[-1])) == first, "tokens_equal": got == want,
            "n_equal_prefix": n if diff is None else diff,
            "teacher_forced_agree": agree, "n": n, "max_rel_logit_err": max(errs),
            "min_top2_margin": min(margins), "numpy_tokens": want, "cuda_tokens": got}


def markdown(res: dict) -> str:
    dev, k, t, hf, chk = res["device"], res["klaq_triton"], res.get("klaq_torch"), res.get("hf"), res["check"]
    lines = [
        "## GPU decode", "",
        f"`python bench/gpu_decode.py` on **{dev}** (torch {res['torch']}, triton {res['triton']}). Package: "
        f"{res['package']}; {k['weight_bytes'] / 2**20:.1f} MiB read per step (int4 linears, fp16 tied head, one "
        f"embedding row) + KV cache. Batch 1, prompt {res['prompt_tokens']} tokens, {res['new_tokens']} new tokens, "
        "greedy.", "",
        "| system | decode tok/s | step (ms) | matmul / rest (ms) | achieved GB/s | of "
        f"{res['bandwidth_gbs']:.0f} GB/s | vs transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    hf_tps = hf["tok_s"] if hf else None

    def row(name, r):
        ratio = f"{r['tok_s'] / hf_tps:.0f}x" if hf_tps else "-"
        return (f"| {name} | **{r['tok_s']:.0f}** | {1e3 / r['tok_s']:.3f} | {r['matmul_s'] * 1e3:.3f} / "
                f"{r['rest_s'] * 1e3:.3f} | {r['achieved_gbs']:.0f} | {100 * r['bandwidth_fraction']:.1f}% | {ratio} |")

    pdl = ", programmatic dependent launch" if k.get("pdl") else ""
    lines.append(row(f"klaq torch backend, Triton W4A16 + fused ops, CUDA graph{pdl} (M=1 launch "
                     f"{k['decode_config'] or 'default'}, attention {k['attn_block_n']} keys/step)", k))
    if res.get("klaq_triton_ab"):
        ab = res["klaq_triton_ab"]
        same = "same" if ab["tokens_equal"] else "different"
        if ab.get("first_diff") is not None:
            same += f" (from token {ab['first_diff']} of {res['new_tokens']}; each run prefills its own cache)"
        how = "on (`KLAQ_PDL=1`)" if ab["pdl"] else "off (`KLAQ_PDL=0`)"
        lines.append(row(f"the same with programmatic dependent launch {how}; {same} greedy tokens", ab))
    if t:
        lines.append(row("klaq torch backend, `--backend torch` (dequant + cuBLAS, torch ops), CUDA graph", t))
    if hf:
        lines.append(f"| transformers {hf['transformers']} fp16 `generate`, random init, same shapes | {hf_tps:.1f} | "
                     f"{1e3 / hf_tps:.1f} | - | - | - | 1x |")
    lines += [
        "",
        f"- Host-driven loop (what `generate()` does: logits to numpy each step): {k['host_loop_tok_s']:.0f} tok/s; "
        f"graph replay alone: {k['graph_tok_s']:.0f} tok/s; roofline at the bandwidth above: "
        f"{k['roofline_tok_s']:.0f} tok/s. Prefill {k['prefill_s'] * 1e3:.1f} ms (eager), graph capture "
        f"{k['capture_s'] * 1e3:.0f} ms.",
        "- Matmul / rest: median replay of the step's graph vs a graph of its matmuls alone (same weights, same "
        "shapes); rest = the difference (norms, RoPE, attention, activation, embedding, argmax).",
        f"- Parity on {'these random weights' if res['package'].startswith('random') else 'this package'}: "
        f"CUDA greedy tokens {'equal' if chk['tokens_equal'] else 'differ from'} "
        f"the numpy runtime's for {chk['n']} tokens (identical prefix {chk['n_equal_prefix']}); teacher-forced "
        f"argmax agreement {chk['teacher_forced_agree']}/{chk['n']}, max relative logit error "
        f"{chk['max_rel_logit_err']:.1e}, smallest numpy top-2 margin {chk['min_top2_margin']:.3g}.",
    ]
    for r in res.get("sweep", []):
        val = f"{r['tok_s']:.0f} tok/s" if "tok_s" in r else r["error"]
        lines.append(f"- sweep: M=1 launch {r['config'] or 'default'}, attention {r['attn_block_n']} keys/step: {val}")
    lines.append("")
    return "\n".join(lines)


EARLIER = "### Earlier runs"


def update_markdown(path: str, section: str) -> None:
    """Replace the '## GPU decode' section with this run's, keeping its '### Earlier runs' part (the
    record of what earlier runs measured and why) below the new table."""
    text = open(path).read() if os.path.exists(path) else "# klaq benchmarks\n\n"
    pat = re.compile(r"^## GPU decode\n.*?(?=^## |\Z)", re.S | re.M)

    def keep_earlier(match: re.Match) -> str:
        old = match.group(0)
        at = old.find("\n" + EARLIER)
        return section + "\n" + (old[at + 1:].rstrip() + "\n\n" if at >= 0 else "")

    text = pat.sub(keep_earlier, text) if pat.search(text) else text.rstrip() + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The index of the first token where ``a`` and ``b`` differ (the shorter's length if one is the
    other's prefix), None where they are equal. Why: two runs that prefill their own cache may part late,
    at a near-tie, which is not what a race inside a step looks like (bench/pdl_decode_check.py tells
    the two apart from one prefilled cache)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", help="a real package instead of the random-weight SmolLM2-shaped one")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="default: the 'cuda' target's")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="try the SWEEP launch settings first, bench the best")
    ap.add_argument("--skip-torch-backend", action="store_true")
    ap.add_argument("--skip-pdl", action="store_true", help="skip the A/B run with PDL switched the other way")
    ap.add_argument("--json")
    ap.add_argument("--markdown", help="update the '## GPU decode' section of this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    import triton

    from klaq.formats.gguf_package import read_package
    from klaq.kernels.pdl import pdl_enabled, pdl_supported
    from klaq.targets.profiles import get_target

    bandwidth = args.bandwidth_gbs or get_target("cuda").bandwidth_gbs
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "bandwidth_gbs": bandwidth, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens}
    path = args.package
    if path is None:
        path = os.path.join(tempfile.mkdtemp(), "random-smollm2-w4g64.gguf")
        res["build_s"] = build_random_package(path)
        res["package"] = ("random weights of the SmolLM2-135M shapes (not the real model), RTN W4 g64 symmetric "
                          "(Q4_0 blocks)")
    else:
        res["package"] = os.path.basename(path)
    res["package_bytes"] = os.path.getsize(path)
    pf = read_package(path)
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(1, pf.hparams.vocab_size, args.prompt_tokens)]
    best = ("model", 128)
    if args.sweep:
        res["sweep"] = sweep(pf, prompt, args.new_tokens)
        ok = [r for r in res["sweep"] if "tok_s" in r]
        if ok:
            top = max(ok, key=lambda r: r["tok_s"])
            best = (top["config"], top["attn_block_n"])
    k = bench_klaq(pf, "triton", prompt, args.new_tokens, bandwidth, *best)
    print(f"klaq triton: {k['tok_s']:.0f} tok/s, step {k['step_s'] * 1e3:.3f} ms (matmul {k['matmul_s'] * 1e3:.3f}), "
          f"{k['achieved_gbs']:.0f} GB/s, host loop {k['host_loop_tok_s']:.0f} tok/s", flush=True)
    res["check"] = check_vs_numpy(pf, k["model"], prompt, args.check_tokens)
    print("check:", {x: y for x, y in res["check"].items() if not x.endswith("tokens")}, flush=True)
    res["klaq_triton"] = {x: y for x, y in k.items() if x not in ("model", "tokens")}
    tokens = k["tokens"]
    res["klaq_triton"]["pdl"] = pdl_enabled("cuda")
    del k
    if not args.skip_pdl and pdl_supported("cuda"):
        before = os.environ.get("KLAQ_PDL")
        os.environ["KLAQ_PDL"] = "0" if res["klaq_triton"]["pdl"] else "1"
        try:
            k1 = bench_klaq(pf, "triton", prompt, args.new_tokens, bandwidth, *best)
            k1["tokens_equal"] = k1["tokens"] == tokens
            k1["first_diff"] = first_difference(k1["tokens"], tokens)
            k1["pdl"] = pdl_enabled("cuda")
        finally:
            if before is None:
                del os.environ["KLAQ_PDL"]
            else:
                os.environ["KLAQ_PDL"] = before
        print(f"klaq triton, PDL {'on' if k1['pdl'] else 'off'}: {k1['tok_s']:.0f} tok/s, step "
              f"{k1['step_s'] * 1e3:.3f} ms (matmul {k1['matmul_s'] * 1e3:.3f}), same tokens: {k1['tokens_equal']}",
              flush=True)
        res["klaq_triton_ab"] = {x: y for x, y in k1.items() if x not in ("model", "tokens")}
        del k1
    if not args.skip_torch_backend:
        t = bench_klaq(pf, "torch", prompt, args.new_tokens, bandwidth)
        print(f"klaq torch: {t['tok_s']:.0f} tok/s, step {t['step_s'] * 1e3:.3f} ms", flush=True)
        res["klaq_torch"] = {x: y for x, y in t.items() if x not in ("model", "tokens")}
        del t
    torch.cuda.empty_cache()
    if not args.skip_hf:
        res["hf"] = bench_hf(prompt, args.new_tokens)
        print(f"transformers: {res['hf']['tok_s']:.1f} tok/s", flush=True)
    md = markdown(res)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.markdown:
        update_markdown(args.markdown, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
