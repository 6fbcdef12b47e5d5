"""Quantization quality: held-out perplexity, KL and top-1 agreement vs FP16, per method.

    python bench/quality.py --model smollm2-135m --config w4g64a --config w3g64a --out BENCHMARKS.md
    python bench/quality.py --methods rtn,gptq,klawq:0.1:1 --config w4g64a     # a subset

Protocol (same for every row): calibration = 128 x 512 tokens from pydoc's calibration part, seed 0
(``--n-calib/--seqlen/--seed``). Evaluation = non-overlapping 512-token windows, each scored from
scratch: in-domain = pydoc's held-out 20% (first ``--windows`` windows), out-of-domain = Debian's
``fortunes`` text (``apt-get install -y fortunes``; English epigrams, jokes and quotes the
calibration never saw; first ``--ood-windows`` windows of the whole corpus). KL = mean token
KL(FP16 ‖ quantized); top-1 = agreement of the argmax next token.

For speed the quantized model is evaluated in transformers with its weights replaced by the
package's dequantized weights (``QuantizedWeight.dequantize()``: the numbers the numpy runtime uses,
which tests pin bit for bit), computed in fp32, like the FP16 reference (fp16 weights in fp32).
Each method runs in its own subprocess so that its peak RSS is its own; time = quantization only.
The FP16 log-probs are computed once and cached (``$KLAQ_CACHE/bench``): one file for small
vocabularies, one file per window above 100k entries (Gemma-3's 262k: 268 MB per window, 17 GB for
the default 64 windows, read back one batch at a time). With ``--live-ref`` each method's
subprocess keeps an FP16 copy and scores both models batch by batch instead (no disk, twice the
evaluation time; the same fp16-rounded log-probs, so the same figures).
Method specs: ``name`` or ``klawq:BETA:TAU[:SOURCE]`` / ``awq+klawq:BETA:TAU``; ``+greedy`` suffix adds
``--rounding greedy``.

Peers: ``llmc-gptq`` and ``llmc-awq`` run llm-compressor (bench/peer_llmcompressor.py) in its own
virtual environment on the same FP16 model directory and the same calibration windows, and are
scored like klaq's rows from their dequantized weights; time = llm-compressor's ``oneshot`` only.
Set the environment up once and point ``--peer-python`` (or ``$KLAQ_LLMC_PYTHON``) at it:

    python -m venv ~/.llmc && ~/.llmc/bin/pip install torch==2.13.0 llmcompressor
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = {  # name -> (bits, group, sym)
    "w4g64a": (4, 64, False), "w3g64a": (3, 64, False), "w4g128a": (4, 128, False), "w3g128a": (3, 128, False),
    "w4g64s": (4, 64, True), "w4g128s": (4, 128, True),
}
DEFAULT_METHODS = "rtn,awq,gptq,klawq:0:1,klawq:0.1:1,klawq:0.5:1,klawq:0.5:0.5,awq+gptq,awq+klawq:0.1:1"
FORTUNES = Path("/usr/share/games/fortunes")
LIVE = "live"  # --ref-cache value: score against a live FP16 copy instead of stored log-probs
LIVE_VOCAB = 100_000  # vocabularies above this store one log-prob file per window (one would not fit RAM)
SKIP_FORTUNES = {"art", "ascii-art"}  # pictures, not prose


def fortunes_text() -> str | None:
    if not FORTUNES.is_dir():
        try:
            subprocess.run(["apt-get", "install", "-y", "fortunes"], check=True, capture_output=True, timeout=600)
        except Exception as exc:  # no apt, no network, not root
            print(f"out-of-domain text unavailable: cannot install Debian 'fortunes' ({type(exc).__name__}); "
                  "out-of-domain columns are left empty", file=sys.stderr)
            return None
    files = sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix and p.name not in SKIP_FORTUNES)
    entries = []
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        entries += [e.strip() for e in text.split("\n%\n") if e.strip()]
    return "\n\n".join(entries)


def eval_sets(tok, windows: int, ood_windows: int, ctx: int) -> dict[str, np.ndarray]:
    from klaq.toolchain.data import eval_windows, token_split

    def encode(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    sets = {"pydoc": eval_windows(token_split("pydoc", encode, "eval"), ctx, windows)}
    ood = fortunes_text()
    if ood is not None and ood_windows:
        sets["fortunes"] = eval_windows(np.asarray(encode(ood), dtype=np.int64), ctx, ood_windows)
    return sets


def logprobs(model, windows: np.ndarray, batch: int = 4):
    import torch

    out = []
    with torch.no_grad():
        for lo in range(0, len(windows), batch):
            logits = model(torch.from_numpy(windows[lo : lo + batch]), use_cache=False).logits.float()
            out.append(torch.log_softmax(logits[:, :-1], -1).half())
    return torch.cat(out)


def _sums(ref_lp, lp, windows: np.ndarray) -> np.ndarray:
    """Per-window sums (nll, nll_ref, kl, agreeing tokens, tokens); fp32 temporaries stay one window."""
    import torch

    out = np.zeros(5)
    for r, q, w in zip(ref_lp, lp, windows, strict=True):
        r, q, tgt = r.float(), q.float(), torch.from_numpy(w[1:])[:, None]
        out += (-float(q.gather(-1, tgt).sum()), -float(r.gather(-1, tgt).sum()),
                float((r.exp() * (r - q)).sum()), int((r.argmax(-1) == q.argmax(-1)).sum()), len(tgt))
    return out


def _finish(sums: np.ndarray) -> dict:
    nll, nll_ref, kl, agree, n = sums
    return {"ppl": float(np.exp(nll / n)), "ppl_ref": float(np.exp(nll_ref / n)), "kl": float(kl / n),
            "top1": float(agree / n)}


def scores(ref_lp, lp, windows: np.ndarray) -> dict:
    return _finish(_sums(ref_lp, lp, windows))


def scores_live(ref_model, model, windows: np.ndarray, batch: int = 2) -> dict:
    """:func:`scores` without stored reference log-probs: both models run batch by batch.

    For large vocabularies (Gemma-3's 262k), where the FP16 log-probs of every evaluation token
    would need tens of GB; the sums are the same as :func:`scores`' (fp16-rounded log-probs).
    """
    sums = np.zeros(5)
    for lo in range(0, len(windows), batch):
        w = windows[lo : lo + batch]
        sums += _sums(logprobs(ref_model, w, batch), logprobs(model, w, batch), w)
    return _finish(sums)


def scores_stored(ref_dir: Path, set_name: str, model, windows: np.ndarray, batch: int = 2) -> dict:
    """:func:`scores` against per-window log-prob files written by :func:`reference` (large vocabularies)."""
    import torch

    sums = np.zeros(5)
    for lo in range(0, len(windows), batch):
        w = windows[lo : lo + batch]
        ref = torch.stack([torch.load(ref_dir / f"{set_name}-{lo + i:03d}.pt") for i in range(len(w))])
        sums += _sums(ref, logprobs(model, w, batch), w)
    return _finish(sums)


def parse_method(spec: str) -> tuple[str, dict]:
    """``klawq:0.1:1[:model]``, ``gptq:damp=0.05``, ``awq:awq_clip=0``, ``rtn+greedy`` -> (method,
    EngineConfig overrides; ``awq_*`` keys are AwqConfig fields)."""
    from klaq.toolchain.engine import EngineConfig

    opts: dict = {}
    if spec.endswith("+greedy"):
        spec, opts["rounding"] = spec[: -len("+greedy")], "greedy"
    name, *parts = spec.split(":")
    positional = [p for p in parts if "=" not in p]
    if name.endswith("klawq"):
        for key, val in zip(("beta", "tau", "kl_source"), positional, strict=False):
            opts[key] = val if key == "kl_source" else float(val)
    from klaq.toolchain.algorithms.awq import AwqConfig
    from klaq.toolchain.archs import GPTQ_GENERIC

    defaults, awq_defaults = EngineConfig(), AwqConfig()
    for kv in (p for p in parts if "=" in p):
        k, v = kv.split("=", 1)  # awq_NAME: AwqConfig's NAME (the engine passes awq_* attributes on)
        cur = getattr(awq_defaults, k.removeprefix("awq_")) if k.startswith("awq_") else getattr(defaults, k)
        cur = GPTQ_GENERIC.get(k, cur) if cur is None else cur  # None: an arch default (archs.GPTQ_DEFAULTS)
        opts[k] = (v.lower() in ("1", "true", "yes")) if isinstance(cur, bool) else type(cur)(v)
    return name, opts


def run_one(args) -> dict:
    """One method in this process: quantize, then score against the cached FP16 log-probs."""
    import torch

    from klaq.toolchain.algorithms.grid import QuantSpec
    from klaq.toolchain.engine import EngineConfig, peak_rss_mb
    from klaq.toolchain.export import ExportConfig, calibration_ids
    from klaq.toolchain.models import load_model
    from klaq.toolchain.quantize import quantize_model_ex

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    live = args.ref_cache == LIVE
    ref_model = copy.deepcopy(lm.model).float() if live else None  # before quantization touches it
    bits, group, sym = CONFIGS[args.config]
    name, opts = parse_method(args.one)
    row = {"method": args.one, "config": args.config}
    seconds, bpw = 0.0, 16.0
    if name.startswith("llmc-"):
        seconds, row["peak_rss_mb"], weights = run_peer(args, lm, name.removeprefix("llmc-"), bits, group, sym)
        model = lm.model.float()
        params = dict(model.named_parameters())
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise SystemExit(f"llm-compressor wrote parameters this model does not have: {unknown[:5]}")
        with torch.no_grad():
            for key, w in weights.items():
                params[key].copy_(w)
        bpw = bits + 16 / group + (0 if sym else bits / group)  # the same layout as klaq's rows
    elif name != "fp16":
        calib = calibration_ids(lm, ExportConfig(model=args.model, output="", n_calib=args.n_calib,
                                                 seqlen=args.seqlen, seed=args.seed))
        awq_opts = {k: opts.pop(k) for k in list(opts) if k.startswith("awq_")}
        engine = EngineConfig(device=args.device, seed=args.seed, threads=args.threads, **opts)
        for k, v in awq_opts.items():
            setattr(engine, k, v)  # read by awq.resolve_config
        t0 = time.perf_counter()
        q, _ = quantize_model_ex(lm.model, name, QuantSpec(bits, group, sym), progress=args.progress,
                                 calib_ids=calib, engine=engine)
        seconds = time.perf_counter() - t0
        bpw = sum(v.nbytes_packed() for v in q.values()) * 8 / sum(v.codes.size for v in q.values())
        row["peak_rss_mb"] = peak_rss_mb()
        model = lm.model.float()
        conv1d = model.config.model_type == "gpt2"
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, qw in q.items():
                w = torch.from_numpy(qw.dequantize())
                params[key].copy_(w.T if conv1d else w)
    else:
        model = lm.model.float()
        row["peak_rss_mb"] = peak_rss_mb()
    row.update(seconds=seconds, bpw=bpw)
    if live:
        for set_name, windows in eval_sets(lm.tokenizer, args.windows, args.ood_windows, args.ctx).items():
            row[set_name] = scores_live(ref_model, model, windows)
        return row
    if args.ref_cache.endswith(".d"):
        ref_dir = Path(args.ref_cache)
        for set_name, windows in torch.load(ref_dir / "windows.pt").items():
            row[set_name] = scores_stored(ref_dir, set_name, model, windows.numpy())
        return row
    ref = torch.load(args.ref_cache)
    for set_name, windows in ref["windows"].items():
        windows = windows.numpy()
        lp = logprobs(model, windows)
        row[set_name] = scores(ref["lp"][set_name], lp, windows)
    return row


def run_peer(args, lm, method: str, bits: int, group: int, sym: bool):
    """llm-compressor's ``method`` in its own environment; returns (seconds, peak RSS MB, weights)."""
    import tempfile

    from safetensors.torch import load_file

    from klaq.toolchain.export import ExportConfig, calibration_ids
    from klaq.toolchain.models import hf_dir

    python = args.peer_python or os.environ.get("KLAQ_LLMC_PYTHON")
    if not python:
        raise SystemExit("llm-compressor rows need --peer-python or $KLAQ_LLMC_PYTHON (see the module docstring)")
    calib = calibration_ids(lm, ExportConfig(model=args.model, output="", n_calib=args.n_calib, seqlen=args.seqlen,
                                             seed=args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        ids, out = os.path.join(tmp, "calib.npy"), os.path.join(tmp, "weights.safetensors")
        np.save(ids, np.asarray(calib, dtype=np.int64))
        cmd = [python, str(Path(__file__).with_name("peer_llmcompressor.py")), "--model-dir", hf_dir(args.model),
               "--calib", ids, "--method", method, "--bits", str(bits), "--group-size", str(group),
               "--threads", str(args.threads), "--out", out] + ([] if sym else ["--asym"])
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"llm-compressor {method} failed:\n{p.stderr[-3000:]}")
        info = json.loads(p.stdout.strip().splitlines()[-1])
        return info["seconds"], info["peak_rss_mb"], load_file(out)


def reference(args):
    import torch

    from klaq.toolchain.models import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    model = lm.model.float()
    sets = eval_sets(lm.tokenizer, args.windows, args.ood_windows, args.ctx)
    windows = {k: torch.from_numpy(w) for k, w in sets.items()}
    if not args.ref_cache.endswith(".d"):
        torch.save({"windows": windows, "lp": {k: logprobs(model, w) for k, w in sets.items()}}, args.ref_cache)
        return
    # large vocabulary: one file per window (Gemma-3: 268 MB each), written to a temporary
    # directory that is renamed only when complete
    out = Path(args.ref_cache)
    tmp = out.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for k, w in sets.items():
        for i in range(len(w)):
            torch.save(logprobs(model, w[i : i + 1])[0].clone(), tmp / f"{k}-{i:03d}.pt")
    torch.save(windows, tmp / "windows.pt")
    tmp.rename(out)


def vocab_size(model: str) -> int:
    from transformers import AutoConfig

    from klaq.toolchain.models import hf_dir

    return int(AutoConfig.from_pretrained(hf_dir(model)).get_text_config().vocab_size)


def fmt_table(model: str, config: str, rows: list[dict], sets: list[str]) -> str:
    bits, group, sym = CONFIGS[config]
    head = f"### {model} W{bits} g{group} {'sym' if sym else 'asym'}\n\n"
    cols = ["method"]
    for s in sets:
        cols += [f"{s} ppl", f"{s} KL", f"{s} top-1"]
    cols += ["bits/weight", "quant time (s)", "peak RSS (MB)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["method"]]
        for s in sets:
            v = r.get(s)
            if v is None:
                cells += ["–"] * 3
            else:
                inc = v["ppl"] / v["ppl_ref"] - 1
                cells += [f"{v['ppl']:.3f} ({inc * 100:+.1f}%)", f"{v['kl']:.4f}", f"{v['top1'] * 100:.2f}%"]
        cells += [f"{r['bpw']:.3f}", f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    start, end = "<!-- quality:start -->", "<!-- quality:end -->"
    doc = path.read_text() if path.exists() else "# klaq benchmarks\n\n## Quantization quality\n\n(bench/quality.py)\n"
    block = f"{start}\n{text}{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end) :]
    elif "(bench/quality.py)\n" in doc:
        doc = doc.replace("(bench/quality.py)\n", "(bench/quality.py)\n\n" + block + "\n", 1)
    else:
        doc += "\n## Quantization quality\n\n" + block + "\n"
    path.write_text(doc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--config", action="append", choices=list(CONFIGS), help="repeatable [w4g64a, w3g64a]")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--ood-windows", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="Markdown file whose quality section is rewritten")
    ap.add_argument("--results", default="bench/results", help="directory for the JSON lines")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--rerun", action="store_true",
                    help="measure the listed methods again even if their rows exist (the newest row wins)")
    ap.add_argument("--peer-python", default=None, help="python of llm-compressor's environment (llmc-* rows)")
    ap.add_argument("--live-ref", action="store_true",
                    help="score against a live FP16 copy instead of cached log-probs")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--ref-cache", help=argparse.SUPPRESS)
    ap.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.config = args.config or ["w4g64a", "w3g64a"]
    if args.reference:
        return reference(args)
    if args.one:
        args.config = args.config[0]
        print(json.dumps(run_one(args)))
        return
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    tag = Path(args.model).name
    from klaq.toolchain.models import cache_dir

    ref_dir = cache_dir() / "bench"  # FP16 log-probs: GBs, kept out of the repository
    ref_dir.mkdir(parents=True, exist_ok=True)
    ref_cache = ref_dir / f"ref-{tag}-{args.windows}-{args.ood_windows}-{args.ctx}.pt"
    if vocab_size(args.model) > LIVE_VOCAB:  # too big for one file in RAM: a file per window
        ref_cache = ref_cache.with_suffix(".d")
    if args.live_ref:
        ref_cache = LIVE
    base = [sys.executable, __file__, "--model", args.model, "--n-calib", str(args.n_calib), "--seqlen",
            str(args.seqlen), "--seed", str(args.seed), "--ctx", str(args.ctx), "--windows", str(args.windows),
            "--ood-windows", str(args.ood_windows), "--device", args.device, "--threads", str(args.threads),
            "--ref-cache", str(ref_cache)] + (["--progress"] if args.progress else []) + \
        (["--peer-python", args.peer_python] if args.peer_python else [])
    if ref_cache != LIVE and not ref_cache.exists():
        subprocess.run(base + ["--reference"], check=True)
    tables = []
    for config in args.config:
        out_jsonl = res_dir / f"quality-{tag}-{config}.jsonl"
        done = {}
        if out_jsonl.exists():
            for line in out_jsonl.read_text().splitlines():
                r = json.loads(line)
                done[r["method"]] = r
        rows = []
        listed = [m for m in args.methods.split(",") if m]
        for method in ["fp16"] + listed:
            if method not in done or (args.rerun and method in listed):
                t0 = time.perf_counter()
                p = subprocess.run(base + ["--config", config, "--one", method], capture_output=True, text=True,
                                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if p.returncode != 0:
                    print(f"{config} {method}: FAILED\n{p.stderr[-2000:]}", file=sys.stderr)
                    continue
                done[method] = json.loads(p.stdout.strip().splitlines()[-1])
                with open(out_jsonl, "a") as f:
                    f.write(json.dumps(done[method]) + "\n")
                print(f"{config} {method}: {time.perf_counter() - t0:.0f} s {json.dumps(done[method])}", flush=True)
            rows.append(done[method])
        sets = [s for s in ("pydoc", "fortunes") if any(s in r for r in rows)]
        tables.append(fmt_table(args.model, config, rows, sets))
    text = "\n".join(tables)
    print(text)
    if args.out:
        write_section(Path(args.out), text)


if __name__ == "__main__":
    main()
