"""Command lines: ``klaq-export``, ``klaq-run``, ``klaq-verify``, ``klaq-targets`` and ``klaq <cmd>``.

Heavy imports (torch, transformers) happen inside the commands that need them, so ``klaq-run``
on a device imports only numpy, gguf and tokenizers. Every user error ends as one line on stderr
and a non-zero exit code; a traceback appears only for bugs, and only with ``KLAQ_DEBUG=1``.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from klaq import __version__
from klaq.errors import KlaqError

EXIT_PARITY = 1


def _fail(prog: str, message: str, code: int):
    click.echo(f"{prog}: error: {message}", err=True)
    sys.exit(code)


def friendly(fn):
    """Turn KlaqError (and stray exceptions) into one line + exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        prog = click.get_current_context().command_path
        try:
            return fn(*args, **kwargs)
        except KlaqError as exc:
            _fail(prog, str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail(prog, "interrupted", 130)
        except Exception as exc:  # a bug: still no traceback unless asked for
            if os.environ.get("KLAQ_DEBUG"):
                raise
            _fail(prog, f"internal error: {type(exc).__name__}: {exc} (set KLAQ_DEBUG=1 for a traceback)", 70)

    return wrapper


def _target_names():
    from klaq.targets.profiles import TARGETS

    return list(TARGETS)


@click.command("export")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Package to write (.gguf file or ONNX directory).")
@click.option("--target", default="x86-cpu", show_default=True, help=f"Device profile: {', '.join(_target_names())}.")
@click.option("--method", default="rtn", show_default=True,
              help="rtn, awq, gptq, klawq, awq+gptq, awq+klawq, or fp16 (no quantization).")
@click.option("--beta", type=float, default=0.0, show_default=True, help="KLAWQ: weight of the KL term (H + beta*A); 0 = GPTQ.")
@click.option("--tau", type=float, default=1.0, show_default=True, help="KLAWQ: softmax temperature (--kl-source layer).")
@click.option("--kl-source", type=click.Choice(["layer", "model"]), default="layer", show_default=True,
              help="KLAWQ token weights: the layer's own softmax, or the whole model's Fisher.")
@click.option("--rounding", type=click.Choice(["nearest", "greedy"]), default="nearest", show_default=True,
              help="Optional greedy rounding-flip pass after the method.")
@click.option("--salience", type=click.Choice(["l1", "l2"]), default="l1", show_default=True,
              help="AWQ activation salience: mean |x| or mean x^2.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="GPTQ dampening, fraction of mean(diag H).")
@click.option("--hessian-shrink", "shrink", type=click.FloatRange(0), default=None,
              help="GPTQ/KLAWQ: add this times diag(H) to H, for robustness to a narrow calibration set "
                   "(0 = plain GPTQ). [default: 0.5; 0 for --method gptq on Gemma 3]")
@click.option("--norm-tokens/--no-norm-tokens", default=None,
              help="GPTQ/KLAWQ: where an RMSNorm normalizes a linear's output (Gemma 3's post-norms, q/k norms), "
                   "weight each calibration token's x x^T by 1 / ms of that output, as the norm scales its error. "
                   "[default: on for --method gptq on Gemma 3, else off]")
@click.option("--fp-target", "fp_target", type=click.FloatRange(0), default=None, metavar="RIDGE",
              help="GPTQ/KLAWQ: fit each linear to the FP model's output from the quantized model's inputs, "
                   "with this ridge (fraction of mean diag H) on the fit; 0 = off (GPTAQ-style; one more FP "
                   "forward per stage, twice the calibration activations). "
                   "[default: 1 for --method gptq on Gemma 3, else 0]")
@click.option("--act-order/--no-act-order", default=True, show_default=True,
              help="GPTQ/KLAWQ: columns by descending Hessian diagonal, grids fitted on the original weights "
                   "(static groups, so the package keeps plain contiguous groups).")
@click.option("--no-propagate", "propagate", flag_value=False, default=True,
              help="Feed the next block FP outputs instead of quantized ones.")
@click.option("--micro-batch", type=click.IntRange(1), default=8, show_default=True, help="Calibration windows per forward.")
@click.option("--activations", type=click.Choice(["auto", "cpu", "disk"]), default="auto", show_default=True,
              help="Where calibration activations wait between blocks: RAM, files in the temp dir "
                   "(one micro-batch in RAM), or disk only when RAM would not hold them.")
@click.option("--bits", type=int, default=None, help="2, 3, 4 or 8 [default: the target's].")
@click.option("--group-size", type=int, default=None, help="32, 64, 128, 256 or -1 per-channel [default: the target's].")
@click.option("--sym/--asym", default=None, help="Symmetric (Q4_0) or asymmetric (Q4_1) grid [default: the target's].")
@click.option("--format", "fmt", default="gguf", show_default=True,
              help="gguf (one file), onnx (a directory), or gguf,onnx (OUT/model.gguf + OUT/onnx/).")
@click.option("--quantize-head", type=click.Choice(["0", "4", "8"]), default="0", show_default=True,
              help="ONNX: quantize the (tied) output head to int4/int8 (0 keeps fp16).")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default="4", show_default=True,
              help="ONNX MatMulNBits: 4 = int8 activations (fast on CPU), 0 = fp32.")
@click.option("--calib", default="pydoc", show_default=True, help="Calibration text: pydoc, a .txt/.jsonl file, wikitext2, c4, pileval.")
@click.option("--n-calib", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda for quantization.")
@click.option("--context", type=int, default=2048, show_default=True, help="Context length for the target fit check.")
@click.option("--reference-windows", type=click.IntRange(0), default=8, show_default=True,
              help="Record the FP16 perplexity on this many held-out pydoc windows (0 = skip).")
@click.option("--lazy/--no-lazy", default=True, show_default=True,
              help="Read the decoder blocks from the model's safetensors one at a time, so host RAM holds "
                   "about one block, not the model (where the weights are safetensors); --no-lazy loads "
                   "the whole model first.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@friendly
def export_cmd(model, output, target, method, beta, tau, kl_source, rounding, salience, damp, shrink, norm_tokens, fp_target, act_order,
               propagate, micro_batch, activations, bits, group_size, sym, fmt, quantize_head, accuracy_level, calib, n_calib, seqlen, seed,
               device, context, reference_windows, lazy, as_json):
    """Quantize MODEL (alias, HF directory or .gguf) and write a device package."""
    from klaq.toolchain.export import ExportConfig, export_model

    cfg = ExportConfig(model=model, output=output, target=target, method=method, bits=bits, group_size=group_size,
                       sym=sym, format=fmt, calib=calib, n_calib=n_calib, seqlen=seqlen, seed=seed, device=device,
                       context=context, quantize_head=int(quantize_head), accuracy_level=int(accuracy_level),
                       reference_windows=reference_windows, beta=beta, tau=tau, kl_source=kl_source,
                       rounding=rounding, salience=salience, damp=damp, shrink=shrink, norm_tokens=norm_tokens, fp_target=fp_target, act_order=act_order,
                       propagate=propagate,
                       micro_batch=micro_batch, activations=activations, lazy=lazy)
    res = export_model(cfg, progress=not as_json)
    if as_json:
        click.echo(json.dumps({"path": res.path, "bytes": res.bytes, "quantized_linears": res.n_quantized,
                               "bits_per_weight": res.bits_per_weight, "seconds": res.seconds,
                               "quant_seconds": res.quant_seconds, "peak_rss_mb": res.peak_rss_mb,
                               "peak_gpu_mb": res.peak_gpu_mb, "lazy": res.lazy, **res.meta}))
    else:
        click.echo(f"wrote {res.path}: {res.bytes / 2**20:.1f} MiB, {res.n_quantized} linears at "
                   f"{res.bits_per_weight:.3f} bits/weight ({res.meta['method']}, target {res.meta['target']}) "
                   f"in {res.seconds:.1f} s")


@click.command("run")
@click.argument("package", type=click.Path())
@click.option("-p", "--prompt", default="Hello", show_default=True)
@click.option("-n", "--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda / cuda:N.")
@click.option("--backend", default=None, help="numpy (CPU), triton or torch (CUDA) [default: by device].")
@click.option("--resident", type=click.Choice(["f32", "int4"]), default="f32", show_default=True,
              help="numpy backend: weights dequantized to float32 at load (fast), or 4-bit weights kept "
                   "packed (about 1/7 of the memory, slower).")
@click.option("--target", default=None, help="Report bandwidth against this device profile [default: the package's].")
@click.option("--pdl/--no-pdl", default=None,
              help="CUDA, Hopper or later: let each decode-step kernel launch while the one before still runs "
                   "(programmatic dependent launch; same results) [default: on; env KLAQ_PDL=0 or 1].")
@click.option("--json", "as_json", is_flag=True, help="Print text and report as one JSON object.")
@friendly
def run_cmd(package, prompt, max_new_tokens, temperature, top_p, seed, device, backend, resident, target, pdl,
            as_json):
    """Generate text from PACKAGE and report load time, TTFT, tokens/s and memory."""
    from klaq.runtime.generate import generate
    from klaq.runtime.package import load_package

    if pdl is not None:  # read by the kernels at each launch (klaq.kernels.pdl)
        os.environ["KLAQ_PDL"] = "1" if pdl else "0"

    pkg = load_package(package, backend=backend, device=device, resident=resident)
    stream = None if as_json else (lambda s: click.echo(s, nl=False))
    if not as_json:
        click.echo(prompt, nl=False)
    if target is not None:
        from klaq.targets.profiles import get_target

        get_target(target)
    report = generate(pkg, prompt, max_new_tokens, temperature, top_p, seed, stream=stream, target=target)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo("")
        click.echo(report.format(), err=True)


@click.command("verify")
@click.argument("package", type=click.Path())
@click.option("--reference", required=True, help="The FP16 model the package came from (alias, HF dir, .gguf).")
@click.option("--dataset", default="pydoc", show_default=True, help="Evaluation text (its held-out 20% part).")
@click.option("--ctx", type=click.IntRange(2), default=512, show_default=True, help="Tokens per window.")
@click.option("--max-ppl-increase", type=float, default=0.05, show_default=True, help="Relative; exit 1 above it.")
@click.option("--max-windows", type=click.IntRange(1), default=None, help="Score at most this many windows.")
@click.option("--json", "as_json", is_flag=True)
@friendly
def verify_cmd(package, reference, dataset, ctx, max_ppl_increase, max_windows, as_json):
    """Check PACKAGE's perplexity, KL and top-1 agreement against its FP16 reference."""
    from klaq.toolchain.verify import verify_package

    rep = verify_package(package, reference, dataset, ctx, max_ppl_increase, max_windows, progress=not as_json)
    click.echo(json.dumps(rep.to_dict()) if as_json else rep.format())
    if not rep.passed:
        sys.exit(EXIT_PARITY)


@click.command("targets")
@click.option("--json", "as_json", is_flag=True)
def targets_cmd(as_json):
    """List the device profiles."""
    from dataclasses import asdict

    from klaq.targets.profiles import TARGETS

    if as_json:
        click.echo(json.dumps({n: asdict(t) for n, t in TARGETS.items()}))
        return
    for t in TARGETS.values():
        click.echo(f"{t.name:18} {t.memory_gb:5.0f} GB  {t.bandwidth_gbs:7.1f} GB/s  {t.default_format}/"
                   f"{t.default_backend}  W{t.default_bits} g{t.default_group_size} "
                   f"{'sym' if t.default_sym else 'asym'}  {t.description}")


@click.group()
@click.version_option(__version__, prog_name="klaq")
def main():
    """klaq: quantize, package and verify language models for edge devices."""


main.add_command(export_cmd)
main.add_command(run_cmd)
main.add_command(verify_cmd)
main.add_command(targets_cmd)


def _standalone(cmd, name):
    def entry():
        cmd(prog_name=name)

    return entry


export_main = _standalone(export_cmd, "klaq-export")
run_main = _standalone(run_cmd, "klaq-run")
verify_main = _standalone(verify_cmd, "klaq-verify")
targets_main = _standalone(targets_cmd, "klaq-targets")
