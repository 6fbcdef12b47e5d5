"""CPU decode benchmark: klaq ONNX package (onnxruntime) vs klaq GGUF (numpy) vs llama.cpp.

    python bench/cpu_decode.py --threads 2 --out cpu_decode.md --json cpu_decode.json
    python bench/cpu_decode.py --ppl [--max-windows N]   # ONNX vs GGUF perplexity, W4 g64 asym

One model (SmolLM2-135M by default), quantized once by klaq with RTN symmetric W4 g32 (exactly
llama.cpp's Q4_0 blocks), written as a GGUF (read by klaq's numpy runtime *and* by llama.cpp
through llama-cpp-python) and as ONNX packages (several graph options). Every system gets the same
token ids: the first ``--prompt-tokens`` of pydoc's held-out part, then ``--new-tokens`` greedy
steps through its KV cache, no EOS stop. Prefill tok/s = prompt tokens / time of the prompt's
forward pass; decode tok/s = decode steps / their time (the sampling argmax included, for every
system). Systems are interleaved within each repeat so that load from other processes on a shared
machine hits all of them alike; the median of ``--repeats`` is reported, with the load average.

llama.cpp: ``llama-cpp-python`` built from its PyPI sdist. On an AMX-capable Xeon, ``-DGGML_NATIVE=ON``
built a library that crashed (general protection fault in libggml-cpu), so the flags are explicit:
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
pip install --no-binary llama-cpp-python llama-cpp-python``. klaq's GGUF stores the (tied) embedding in fp16, so llama.cpp's
output head is fp16 there; the ONNX rows say which head each uses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

ONNX_VARIANTS = {  # name -> (accuracy_level, quantize_head)
    "onnx acc4 head-q4": (4, 4),
    "onnx acc4 head-q8": (4, 8),
    "onnx acc4 head-fp": (4, 0),
    "onnx acc0 head-fp": (0, 0),
}


@dataclass
class Result:
    system: str
    prefill: list[float] = field(default_factory=list)  # tok/s per repeat
    decode: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # greedy tokens of the last repeat
    note: str = ""

    def summary(self) -> dict:
        med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
        return {"system": self.system, "prefill_tok_s": med(self.prefill), "decode_tok_s": med(self.decode),
                "prefill_all": self.prefill, "decode_all": self.decode, "note": self.note}


def build_packages(model: str, workdir: str, threads: int) -> tuple[str, dict[str, str]]:
    from klaq.formats.gguf_package import write_package
    from klaq.formats.onnx_package import write_onnx_package
    from klaq.toolchain.algorithms.grid import QuantSpec
    from klaq.toolchain.export import build_package
    from klaq.toolchain.models import load_model
    from klaq.toolchain.quantize import quantize_model

    os.makedirs(workdir, exist_ok=True)
    gguf = os.path.join(workdir, "w4g32sym.gguf")
    onnx_dirs = {name: os.path.join(workdir, f"onnx-acc{a}-qh{h}") for name, (a, h) in ONNX_VARIANTS.items()}
    if os.path.exists(gguf) and all(os.path.exists(os.path.join(d, "klaq.json")) for d in onnx_dirs.values()):
        return gguf, onnx_dirs
    lm = load_model(model)
    spec = QuantSpec(bits=4, group_size=32, sym=True)
    q = quantize_model(lm.model, "rtn", spec, progress=False)
    pkg = build_package(lm, q, {"method": "rtn", "bits": 4, "group_size": 32, "sym": True, "source": model})
    write_package(pkg, gguf)
    for name, (acc, head) in ONNX_VARIANTS.items():
        write_onnx_package(pkg, onnx_dirs[name], quantize_head=head, accuracy_level=acc)
    return gguf, onnx_dirs


class KlaqRunner:
    def __init__(self, model):
        self.model = model

    def prefill(self, ids):
        self.cache = self.model.new_cache(len(ids) + 1024)
        return int(np.argmax(self.model.forward(ids, self.cache)[-1]))

    def step(self, tok):
        return int(np.argmax(self.model.forward([tok], self.cache)[-1]))


class LlamaCppRunner:
    def __init__(self, path: str, threads: int, n_ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=512, n_ubatch=512, verbose=False)
        self.version = llama_cpp.__version__

    def _last(self):
        # llama-cpp-python keeps no scores without logits_all: read the last token's logits directly
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(list(ids))
        return self._last()

    def step(self, tok):
        self.llm.eval([tok])
        return self._last()


def resident_bytes(model) -> int:
    """Bytes of weights the numpy decoder keeps: packed codes for NumpyW4, arrays otherwise."""
    from klaq.kernels import NumpyW4

    total, seen = 0, set()

    def add(obj):
        nonlocal total
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, NumpyW4):
            total += obj.nbytes()
        elif isinstance(obj, np.ndarray):
            total += obj.nbytes
        elif callable(obj) and getattr(obj, "__closure__", None):  # a dense lambda: its matrix
            for cell in obj.__closure__:
                add(cell.cell_contents)
        elif hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                for item in (v if isinstance(v, list) else [v]):
                    add(item)

    add(model)
    return total


def run_once(runner, ids, new_tokens: int) -> tuple[float, float, list[int]]:
    t0 = time.perf_counter()
    tok = runner.prefill(ids)
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(new_tokens - 1):
        tok = runner.step(tok)
        out.append(tok)
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), (new_tokens - 1) / (t2 - t1), out


PPL_VARIANTS = {"acc0-qh0": (0, 0), "acc4-qh0": (4, 0), "acc0-qh8": (0, 8), "acc4-qh8": (4, 8), "acc4-qh4": (4, 4)}


def ppl_check(model: str, workdir: str, threads: int, max_windows: int | None) -> dict:
    """Held-out pydoc perplexity (klaq-verify's protocol: eval split, 512-token windows) of ONNX
    packages against the GGUF numpy path, on one RTN W4 g64 asymmetric quantization of ``model``."""
    from klaq.formats.gguf_package import write_package
    from klaq.formats.onnx_package import write_onnx_package
    from klaq.runtime.onnx_model import load_onnx_package
    from klaq.runtime.package import load_package
    from klaq.toolchain.algorithms.grid import QuantSpec
    from klaq.toolchain.data import eval_windows, token_split
    from klaq.toolchain.export import build_package
    from klaq.toolchain.models import load_model
    from klaq.toolchain.quantize import quantize_model
    from klaq.toolchain.verify import Scores

    os.makedirs(workdir, exist_ok=True)
    gguf = os.path.join(workdir, "w4g64asym.gguf")
    dirs = {v: os.path.join(workdir, f"w4g64asym-{v}") for v in PPL_VARIANTS}
    if not os.path.exists(gguf) or not all(os.path.exists(os.path.join(d, "klaq.json")) for d in dirs.values()):
        lm = load_model(model)
        q = quantize_model(lm.model, "rtn", QuantSpec(4, 64, False), progress=False)
        pkg = build_package(lm, q, {"method": "rtn", "bits": 4, "group_size": 64, "sym": False, "source": model})
        write_package(pkg, gguf)
        for v, (acc, head) in PPL_VARIANTS.items():
            write_onnx_package(pkg, dirs[v], quantize_head=head, accuracy_level=acc)
    ref = load_package(gguf)
    windows = eval_windows(token_split("pydoc", ref.tokenizer.encode, "eval"), 512, max_windows)
    models = {v: load_onnx_package(d, threads=threads)[0] for v, d in dirs.items()}
    scores = {v: Scores() for v in dirs}
    for w in windows:
        want = ref.model.forward(w, ref.model.new_cache(512))
        for v, m in models.items():
            scores[v].add(want, m.forward(w, m.new_cache(512)), w)
    first = scores[next(iter(scores))]
    base = float(np.exp(first.nll_ref / first.n))
    out = {"model": model, "windows": len(windows), "tokens": first.n, "ppl_gguf_numpy": base}
    for v, sc in scores.items():
        p = float(np.exp(sc.nll_pkg / sc.n))
        out[v] = {"ppl": p, "rel_vs_gguf": p / base - 1, "kl_vs_gguf": sc.kl / sc.n, "top1_vs_gguf": sc.agree / sc.n}
    print(json.dumps(out, indent=1))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--numpy-repeats", type=int, default=1, help="repeats of the numpy runtime (f32 and int4 "
                    "resident); 0 skips it")
    ap.add_argument("--variants", default=",".join(ONNX_VARIANTS), help="ONNX variants to run")
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("KLAQ_CACHE", os.path.expanduser("~/.cache/klaq")),
                                                      "bench-cpu-decode"))
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-spin", action="store_true", help="threads sleep instead of spinning at barriers "
                    "(OMP_WAIT_POLICY=PASSIVE for llama.cpp, allow_spinning=0 for onnxruntime): fairer on a "
                    "shared, oversubscribed machine")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--ppl", action="store_true", help="run the perplexity check instead of the speed benchmark")
    ap.add_argument("--max-windows", type=int, default=None, help="--ppl: limit the 512-token windows")
    args = ap.parse_args(argv)
    if args.ppl:
        return ppl_check(args.model, args.workdir, args.threads, args.max_windows)
    if args.no_spin:  # before llama.cpp's OpenMP runtime starts
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))

    from klaq.formats.tokenizer import PackageTokenizer
    from klaq.runtime.onnx_model import load_onnx_package
    from klaq.runtime.package import load_package
    from klaq.toolchain.data import token_split

    gguf, onnx_dirs = build_packages(args.model, args.workdir, args.threads)
    numpy_pkg = load_package(gguf)
    tok = PackageTokenizer(numpy_pkg.file.tokenizer)
    ids = [int(i) for i in token_split("pydoc", tok.encode, "eval")[: args.prompt_tokens]]
    n_ctx = args.prompt_tokens + args.new_tokens + 8

    runners: dict[str, object] = {}
    sizes: dict[str, int] = {}
    for name in [v for v in args.variants.split(",") if v]:
        cfg = {"session.intra_op.allow_spinning": "0"} if args.no_spin else None
        model, pf = load_onnx_package(onnx_dirs[name], threads=args.threads, session_config=cfg)
        runners[f"klaq {name}"] = KlaqRunner(model)
        sizes[f"klaq {name}"] = pf.weight_bytes
    llama_version = None
    if not args.no_llama_cpp:
        lc = LlamaCppRunner(gguf, args.threads, n_ctx)
        runners["llama.cpp Q4_0 (head fp16)"] = lc
        sizes["llama.cpp Q4_0 (head fp16)"] = os.path.getsize(gguf)
        llama_version = lc.version
    results = {name: Result(name) for name in runners}
    load_before = os.getloadavg()
    for r in runners.values():  # warm-up: first-call allocations, weight repacking
        run_once(r, ids[:16], 4)
    for _ in range(args.repeats):
        for name, r in runners.items():
            p, d, out = run_once(r, ids, args.new_tokens)
            results[name].prefill.append(p)
            results[name].decode.append(d)
            results[name].tokens = out
    if args.numpy_repeats:  # after the interleaved systems: the int4-resident path is ~10x slower
        for resident in ("f32", "int4"):
            name = f"klaq numpy GGUF ({resident} resident)"
            model = load_package(gguf, resident=resident).model
            results[name] = Result(name, note=f"numpy runtime, GGUF Q4_0, weights resident as {resident}")
            sizes[name] = resident_bytes(model)
            r = KlaqRunner(model)
            run_once(r, ids[:16], 2)
            for _ in range(args.numpy_repeats):
                p, d, out = run_once(r, ids, args.new_tokens)
                results[name].prefill.append(p)
                results[name].decode.append(d)
                results[name].tokens = out
    load_after = os.getloadavg()

    summary = [results[n].summary() for n in results]
    ref_name = next((n for n in results if n.startswith("llama.cpp")), None)
    ref = results[ref_name].summary() if ref_name else None
    first_tokens = results[ref_name].tokens if ref_name else next(iter(results.values())).tokens
    for s in summary:
        s["bytes"] = sizes.get(s["system"])
        s["same_greedy_tokens_as_llama_cpp"] = (sum(a == b for a, b in zip(results[s["system"]].tokens, first_tokens,
                                                                         strict=False))
                                                if ref else None)
        if ref:
            s["decode_vs_llama_cpp"] = s["decode_tok_s"] / ref["decode_tok_s"]
            s["prefill_vs_llama_cpp"] = s["prefill_tok_s"] / ref["prefill_tok_s"]
    report = {
        "model": args.model, "threads": args.threads, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
        "repeats": args.repeats, "no_spin": args.no_spin, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "loadavg_before": load_before, "loadavg_after": load_after, "llama_cpp_python": llama_version,
        "onnxruntime": __import__("onnxruntime").__version__, "results": summary,
    }
    md = format_markdown(report)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def format_markdown(report: dict) -> str:
    lines = [
        f"{report['model']}, RTN W4 g32 symmetric (= Q4_0), {report['threads']} threads, prompt "
        f"{report['prompt_tokens']} tokens, {report['new_tokens']} new tokens, median of {report['repeats']} "
        f"(load average before/after: {report['loadavg_before'][0]:.2f} / {report['loadavg_after'][0]:.2f}"
        f"{', no spinning' if report.get('no_spin') else ''}); "
        f"onnxruntime {report['onnxruntime']}, llama-cpp-python {report['llama_cpp_python']}",
        "",
        "| system | weights MiB | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp | "
        f"greedy tokens = llama.cpp's (of {report['new_tokens']}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["results"]:
        mib = f"{s['bytes'] / 2**20:.1f}" if s.get("bytes") else ""
        ratio = lambda k, s=s: f"{s[k]:.2f}x" if k in s else ""  # noqa: E731
        same = s.get("same_greedy_tokens_as_llama_cpp")
        lines.append(f"| {s['system']} | {mib} | {s['prefill_tok_s']:.0f} | {s['decode_tok_s']:.1f} | "
                     f"{ratio('prefill_vs_llama_cpp')} | {ratio('decode_vs_llama_cpp')} | "
                     f"{'' if same is None else same} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
