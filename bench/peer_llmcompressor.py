"""Run llm-compressor's GPTQ or AWQ on klaq's calibration windows; write the dequantized weights.

Runs in llm-compressor's own virtual environment (its pins differ from klaq's), started by
``bench/quality.py`` for the ``llmc-gptq`` / ``llmc-awq`` rows:

    PEER/bin/python bench/peer_llmcompressor.py --model-dir DIR --calib ids.npy --method gptq \
        --bits 4 --group-size 64 --asym --out weights.safetensors

Same inputs as klaq's methods: the FP16 model directory klaq evaluates against and the exact
``[n, seqlen]`` token windows klaq calibrates on (no dataset loading, no chat template). Recipe:
llm-compressor's defaults for the method (GPTQ: dampening 0.01, sequential by layer; AWQ: its
default mappings and duo scaling) with a W{bits} group-{g} int scheme on every Linear but the
head. Output (:func:`collect_weights`): every parameter in fp32, each quantized Linear as
``fake_quantize(weight, weight_scale, weight_zero_point)`` (what the packed model computes with);
stdout: one JSON line with the time ``oneshot`` took and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# This directory holds bench/kernels.py, which would shadow Hugging Face's ``kernels`` package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Parameters llm-compressor adds to a quantized Linear; klaq's model has no such names.
QUANT_PARAMS = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale", "input_scale",
                "input_zero_point", "output_scale", "output_zero_point")


def collect_weights(model, fake_quantize) -> dict:
    """Every parameter as the quantized model computes with it, in fp32: each quantized Linear's
    ``fake_quantize(weight, scale, zero point)``, and every other parameter as the recipe left it.

    The second part matters for AWQ: it folds its scales into the norms before q/k/v and
    gate/up (and into v_proj / up_proj, which are quantized Linears anyway). Writing only the
    Linears evaluated AWQ's scaled weights against the original norms (perplexity 1.7e6).
    """
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] not in QUANT_PARAMS:
                out[name] = p.detach().float().contiguous()
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and hasattr(mod, "weight_scale"):
                zp = getattr(mod, "weight_zero_point", None)
                out[f"{name}.weight"] = fake_quantize(mod.weight, mod.weight_scale, zp,
                                                      mod.quantization_scheme.weights).float().contiguous()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--calib", required=True, help=".npy of int token ids [n, seqlen]")
    ap.add_argument("--method", choices=["gptq", "awq"], required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    ids = np.load(args.calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=not args.asym, strategy="group",
                               group_size=args.group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if args.method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = AWQModifier(config_groups=groups, ignore=["lm_head"])
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its activation cache (cache.pin_memory), which raises
        # "Cannot access accelerator device when none is available" on a CPU-only machine. Pinning
        # only speeds host-to-device copies; without a device it is the identity.
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ids), max_seq_length=ids.shape[1])
    seconds = time.perf_counter() - t0
    out = collect_weights(model, fake_quantize)
    save_file(out, args.out)
    import llmcompressor

    print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "quantized": len(out), "llmcompressor": llmcompressor.__version__}))


if __name__ == "__main__":
    main()
