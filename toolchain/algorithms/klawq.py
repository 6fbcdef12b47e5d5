"""KLAWQ: GPTQ on ``H + β·A``, where ``A`` re-weights each calibration token's ``x xᵀ``.

Two sources of the per-token weight ``k_t`` (reference notes §6):

* ``layer`` (the seed's definition, as its code ships it): ``p_t = softmax(W x_t / τ)`` over the
  layer's *own* FP outputs (``W`` the layer's unquantized weight, no bias), ``k_t = 1 - ‖p_t‖²``
  (the trace of the softmax Jacobian); ``A = (1/N) Σ_t k_t x_t x_tᵀ``. Tokens with a diffuse
  output get up to ``1 + β`` times the GPTQ weight, tokens dominated by a few output channels ~1.
* ``model``: ``k_t`` is the Fisher information of the *whole model's* next-token distribution with
  respect to this layer's output at token ``t``: ``k_t = ‖∂ log p(y | ·)/∂z_t‖²`` with ``y`` sampled
  from the FP model's own distribution at every position (a one-sample estimate of
  ``E_y[‖∇_z log p(y)‖²]``, the trace of the Fisher of KL(p_FP ‖ p_Q) at ``Q = FP``). Computed once
  per calibration batch with one backward pass through the FP model; weights are normalized to mean
  1 per layer so that β means the same thing for every layer. ``A = (1/N) Σ_t k_t x_t x_tᵀ``.

With β = 0 no ``A`` is formed and the Hessian handed to GPTQ is exactly GPTQ's: bit-identical codes.
"""

from __future__ import annotations

import torch

KL_SOURCES = ("layer", "model")


def layer_token_weights(x: torch.Tensor, weight: torch.Tensor, tau: float, conv1d: bool = False,
                        chunk: int = 8192) -> torch.Tensor:
    """``1 - ‖softmax(W x / τ)‖²`` for every row of ``x`` [T, K] (``weight`` [N, K], or [K, N] for Conv1D)."""
    out = []
    w = weight.float()
    for xc in x.split(chunk):
        z = xc @ w if conv1d else xc @ w.T
        p = torch.softmax(z / tau, dim=-1)
        out.append(1.0 - (p * p).sum(-1))
    return torch.cat(out)


def norm_token_weights(x: torch.Tensor, weight: torch.Tensor, width: int, floor: float = 0.01,
                       chunk: int = 8192) -> torch.Tensor:
    """``mean_g 1 / ms_g(W x_t)`` for every row of ``x`` [T, K]: the output ``W x_t`` is cut into
    groups of ``width`` (what the RMSNorm after the linear normalizes: the whole row, or one head),
    ``ms_g`` is a group's mean square. An RMSNorm divides its input by ``rms``, so an error in the
    linear's output reaches the rest of the model scaled by ``1 / rms``: squared, the weight of
    the token in the layer's output error. ``ms`` is floored at ``floor`` times its batch mean
    (a near-zero output would otherwise take all the weight).
    """
    w = weight.float()
    ms = torch.cat([(xc @ w.T).reshape(xc.shape[0], -1, width).pow(2).mean(-1) for xc in x.split(chunk)])
    return (1.0 / ms.clamp_min(floor * ms.mean(0))).mean(-1)


def add_weighted_outer(acc: torch.Tensor, x: torch.Tensor, k: torch.Tensor, chunk: int = 8192) -> None:
    """``acc += Σ_t k_t x_t x_tᵀ`` in fp32 chunks."""
    for xc, kc in zip(x.split(chunk), k.split(chunk), strict=True):
        acc.addmm_((xc * kc[:, None]).T, xc)


def klawq_hessian(h: torch.Tensor, a: torch.Tensor | None, beta: float) -> torch.Tensor:
    """``H + β·A`` (``H`` itself, untouched, when β = 0 or there is no ``A``)."""
    if beta == 0 or a is None:
        return h
    return h + beta * a


def model_fisher_weights(model, layers, names: dict[str, list[str]], calib_ids: torch.Tensor, micro_batch: int,
                         seed: int, conv1d: bool = False, progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-token Fisher weights ``‖∂ log p(y)/∂z_t‖²`` for every quantized linear's output.

    ``names[block index]`` lists the linears (relative to the block); returns ``{f"{i}.{name}":
    weights [n_calib, T]}`` (fp32, CPU), each normalized to mean 1. Runs the FP model (fp32, CPU)
    forward + backward once per micro-batch; ``y`` is sampled from the model's own distribution
    with a generator seeded by ``seed``.
    """
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    n, t = calib_ids.shape
    out: dict[str, torch.Tensor] = {}
    mods = {}
    for i, layer_names in names.items():
        for name in layer_names:
            mods[f"{i}.{name}"] = layers[i].get_submodule(name)
            out[f"{i}.{name}"] = torch.zeros(n, t)
    cur = {"lo": 0}
    handles = []

    def make(key):
        def fwd_hook(module, args, output):
            def grad_hook(g):
                b = g.shape[0]
                out[key][cur["lo"] : cur["lo"] + b] = (g.float() ** 2).sum(-1).cpu()

            if output.requires_grad:
                output.register_hook(grad_hook)

        return fwd_hook

    for key, mod in mods.items():
        handles.append(mod.register_forward_hook(make(key)))
    dtype = next(model.parameters()).dtype
    was_training = model.training
    req = [p.requires_grad for p in model.parameters()]
    try:
        model.float().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        for lo in tqdm(range(0, n, micro_batch), desc="fisher", unit="batch", disable=not progress):
            ids = calib_ids[lo : lo + micro_batch]
            cur["lo"] = lo
            inp = emb(ids).detach().requires_grad_(True)  # makes every layer output part of the graph
            logits = model(inputs_embeds=inp, use_cache=False).logits.float()
            with torch.no_grad():
                probs = torch.softmax(logits, -1).reshape(-1, logits.shape[-1])
                y = torch.multinomial(probs, 1, generator=gen).reshape(logits.shape[:-1])
            logp = torch.log_softmax(logits, -1).gather(-1, y[..., None]).sum()
            logp.backward()
    finally:
        for hnd in handles:
            hnd.remove()
        model.to(dtype)
        for p, r in zip(model.parameters(), req, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    for key, v in out.items():
        m = v.mean()
        out[key] = v / m if m > 0 else torch.ones_like(v)
    return out
