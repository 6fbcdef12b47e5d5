"""Activation-aware weight quantization (AWQ): per-group scale search, folding, clip search.

One decoder block at a time, in place (``reference/algorithms.md`` §3; AutoAWQ's behaviour with
llm-compressor's identity candidate added):

1. **Scale search**, per scaling group of the architecture table (``toolchain/archs.py``): the
   salience of each input channel of the group's linears (mean ``|x|``, or ``sqrt(mean x^2)``)
   over *all* calibration tokens, and the weights' per-channel mean of ``|w| / max|w|`` within
   quantization groups. Candidates ``s = x^a / w^(1-a)`` (duo scaling) or ``s = x^a``, for
   ``a in {0, 1/n, ..., 1}``, normalized to ``s / sqrt(max(s) min(s))``, plus the identity. Each
   candidate's linears become ``Q(W diag(s)) diag(s)^-1`` (fake quantization on the package's
   grid, :func:`~klaq.toolchain.algorithms.grid.fake_quantize`) and the group's ``inspect``
   module (the whole attention / MLP, or the single linear) runs on a token-bounded subset of the
   calibration data; the loss is the MSE against its FP output. The identity wins ties, so the
   search never makes the measured loss worse than plain RTN.
2. **Folding** the winner into the previous op: a norm's weight (and bias) ``/ s`` (Gemma's
   ``1 + w`` norms: ``w' = (1 + w) / s - 1``), or the previous linear's output rows (and bias)
   ``/ s``; the group's linears' input columns ``* s``. The FP block computes the same function
   afterwards (checked on one micro-batch; a mismatch reverts the block with a warning).
   ``v -> o`` under grouped-query attention is folded exactly: one scale per ``v`` output channel,
   repeated over the query heads that share it.
3. **Clip search** per linear (AutoAWQ ``_search_best_clip``; q/k projections are skipped): per
   output row and quantization group, the grid's range is shrunk by ratios ``1, 1 - 1/n, ...``
   down to ``clip_min_ratio`` and the ratio with the smallest output error of that group on
   sampled inputs wins; weights are clamped to the chosen range in place, in exactly the way that
   makes a later :func:`fit_grid` reproduce the searched grid. A row whose total output error
   would grow is left unclipped, so the layer's measured error never increases.

No NaN failures: a group with non-finite or all-zero statistics, a non-finite FP output, or no
finite candidate keeps the identity scale and says so with :func:`warnings.warn`; input channels
that never carry signal keep scale 1.

Memory: salience statistics are running fp32 sums; the loss keeps the inspect module's inputs for
at most ``loss_tokens`` tokens (whole micro-batches for attention, sampled tokens for a lone
linear), the clip search ``clip_tokens`` sampled tokens per linear.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch
from torch import nn

from klaq.errors import KlaqError
from klaq.toolchain.algorithms.grid import QuantSpec, fake_quantize, fit_grid
from klaq.toolchain.archs import QuantArch, ScaleGroup

SALIENCES = ("l1", "l2")
# Linears whose clip search is skipped (AutoAWQ: the QK product makes clipping hard to get right);
# matched against the last component of the module path. Fused qkv linears carry q and k too.
NO_CLIP = ("q_proj", "k_proj", "query", "key", "qkv", "qkv_proj", "Wqkv", "c_attn", "query_key_value")
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")
_CHUNK = 1 << 24  # elements per chunk of the clip search's error tensor


@dataclass
class AwqConfig:
    n_grid: int = 20  # alpha in {0, 1/n, ..., 1}: both ends included
    duo_scaling: bool | str = True  # s = x^a / w^(1-a); False: s = x^a; "both": both grids
    salience: str = "l1"  # "l1": mean |x| ; "l2": sqrt(mean x^2)
    clip: bool = True  # clip search after scaling
    clip_grid: int = 20
    clip_min_ratio: float = 0.5
    clip_tokens: int = 512  # sampled tokens per linear for the clip search (AutoAWQ: 512)
    loss_tokens: int = 4096  # tokens the scale search's loss is measured on
    verify: bool = True  # check that folding left the FP block's output unchanged
    seed: int = 0


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once the wanted inputs are recorded."""


# ---------------------------------------------------------------------------------------------
# small helpers


def resolve_config(cfg) -> AwqConfig:
    """An :class:`AwqConfig` from ``cfg``: itself, its ``.awq`` attribute, or the matching fields
    (``name`` or ``awq_name``) of any other config object (the engine's ``EngineConfig``)."""
    if cfg is None:
        out = AwqConfig()
    elif isinstance(cfg, AwqConfig):
        out = cfg
    elif isinstance(getattr(cfg, "awq", None), AwqConfig):
        out = cfg.awq
    else:
        kw = {}
        for f in fields(AwqConfig):
            for attr in (f.name, "awq_" + f.name):
                if hasattr(cfg, attr) and getattr(cfg, attr) is not None:
                    kw[f.name] = getattr(cfg, attr)
        out = AwqConfig(**kw)
    if out.salience not in SALIENCES:
        raise KlaqError(f"--salience must be one of {', '.join(SALIENCES)}, got {out.salience!r}")
    if out.duo_scaling not in (True, False, "both"):
        raise KlaqError(f"duo_scaling must be True, False or 'both', got {out.duo_scaling!r}")
    if out.n_grid < 1 or out.clip_grid < 1 or not 0.0 < out.clip_min_ratio <= 1.0:
        raise KlaqError("AWQ needs n_grid >= 1, clip_grid >= 1 and 0 < clip_min_ratio <= 1")
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _is_conv1d(mod: nn.Module, arch: QuantArch) -> bool:
    return arch.conv1d and not isinstance(mod, nn.Linear)


def _wview(mod: nn.Module, conv: bool) -> torch.Tensor:
    """The module's weight data as an ``[out, in]`` view (GPT-2's Conv1D stores ``[in, out]``)."""
    w = mod.weight.data
    return w.t() if conv else w


def _get_w(mod: nn.Module, conv: bool) -> torch.Tensor:
    return _wview(mod, conv).float().clone()


def _set_w(mod: nn.Module, conv: bool, w: torch.Tensor) -> None:
    view = _wview(mod, conv)
    view.copy_(w.to(device=view.device, dtype=view.dtype))


def _clean_kwargs(kw: dict) -> dict:
    out = dict(kw)
    for k in _CACHE_KWARGS:
        if k in out:
            out[k] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _pad_cols(t: torch.Tensor, k_to: int) -> torch.Tensor:
    pad = k_to - t.shape[-1]
    return t if pad == 0 else torch.nn.functional.pad(t, (0, pad))


def _token_plan(inputs: list[torch.Tensor], budget: int, gen: torch.Generator) -> list[torch.Tensor | None]:
    """Per micro-batch, the (sorted) flat token indices of a random sample of about ``budget``."""
    counts = [x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0] for x in inputs]
    total = sum(counts)
    plan: list[torch.Tensor | None] = []
    for n in counts:
        k = n if total <= budget else max(1, round(budget * n / total))
        k = min(k, n)
        idx = torch.randperm(n, generator=gen)[:k].sort().values if k < n else torch.arange(n)
        plan.append(idx)
    return plan


def _batch_subset(inputs: list[torch.Tensor], budget: int) -> list[int]:
    """Indices of whole micro-batches, evenly spread, whose tokens fit ``budget`` (at least one)."""
    n = len(inputs)
    if n == 0:
        return []
    per = max(1, sum(x.shape[0] * x.shape[1] for x in inputs) // n)
    k = max(1, min(n, budget // per))
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [0]


# ---------------------------------------------------------------------------------------------
# statistics and candidate scales


def weight_salience(ws: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """AutoAWQ's ``w_mean``: per input channel, the mean over all rows of the group's linears of
    ``|w| / max|w|`` within each quantization group (ragged last group handled)."""
    w = torch.cat([x.float() for x in ws], 0).abs()
    n, k = w.shape
    gs = spec.groups_for(k)
    g = -(-k // gs)
    wg = _pad_cols(w, g * gs).view(n, g, gs)
    wg = wg / (wg.amax(dim=2, keepdim=True) + 1e-6)
    return wg.reshape(n, g * gs)[:, :k].mean(0)


def candidate_scales(x_stat: torch.Tensor, w_stat: torch.Tensor | None, alpha: float, duo: bool) -> torch.Tensor:
    """One candidate scale vector, AutoAWQ's formula, normalized to ``s / sqrt(max(s) min(s))``.

    ``alpha = 0`` without duo scaling is exactly the identity. Channels whose salience is zero
    (they never carry signal) keep scale 1: a tiny scale there would blow up the folded norm.
    """
    x = x_stat.float()
    s = x.pow(alpha)
    if duo:
        s = s / (w_stat.float().pow(1.0 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    s = torch.where(x > 0, s, torch.ones_like(s))
    s = s / torch.sqrt(s.max() * s.min())
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def _alphas(n: int) -> list[float]:
    return [i / n for i in range(n + 1)]


# ---------------------------------------------------------------------------------------------
# folding


def _gqa_index(block: nn.Module, group: ScaleGroup, n_prev: int, k_lin: int) -> torch.Tensor | None:
    """For ``v -> o`` with grouped-query attention: the v channel feeding each o input channel."""
    if k_lin == n_prev:
        return torch.arange(k_lin)
    if group.prev_kind != "linear" or k_lin % n_prev:
        return None
    parent = group.prev.rsplit(".", 1)[0] if "." in group.prev else ""
    hd = getattr(block.get_submodule(parent), "head_dim", None) if parent else None
    if not isinstance(hd, int) or hd <= 0 or n_prev % hd or k_lin % hd:
        return None
    n_kv, n_heads = n_prev // hd, k_lin // hd
    n_rep = n_heads // n_kv
    # HF repeat_kv: query head h reads kv head h // n_rep; o's input channel h*hd + d
    h = torch.arange(n_heads).repeat_interleave(hd)
    d = torch.arange(hd).repeat(n_heads)
    return (h // n_rep) * hd + d


def _group_shapes(block: nn.Module, group: ScaleGroup, arch: QuantArch):
    """(number of scaled prev channels, linears' input width, o->v index) or a reason to skip."""
    lins = [block.get_submodule(n) for n in group.linears]
    ks = {_wview(m, _is_conv1d(m, arch)).shape[1] for m in lins}
    if len(ks) != 1:
        return None, f"linears of the group have different input widths {sorted(ks)}"
    k = ks.pop()
    prev = block.get_submodule(group.prev)
    if group.prev_kind == "linear":
        n_prev = _wview(prev, _is_conv1d(prev, arch)).shape[0]
        if n_prev < k:
            idx = _gqa_index(block, group, n_prev, k)
            if idx is None:
                return None, f"{group.prev} has {n_prev} outputs, {group.linears[0]} {k} inputs"
            return (n_prev, k, idx), None
        return (k, k, None), None  # last k rows of prev (fused outputs)
    w = getattr(prev, "weight", None)
    if w is None or w.numel() != k:
        return None, f"{group.prev} has no weight of size {k}"
    return (k, k, None), None


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, arch: QuantArch, s: torch.Tensor,
                index: torch.Tensor | None = None) -> None:
    """Divide the previous op's output channels by ``s`` and multiply the linears' input columns.

    ``s`` has one entry per scaled output channel of ``prev`` (for ``v -> o`` under GQA: per v
    channel; ``index`` maps each linear input channel to its v channel). Exact in exact arithmetic.
    """
    s = s.float()
    s_lin = s if index is None else s[index.to(s.device)]
    prev = block.get_submodule(group.prev)
    n = s.numel()
    kind = group.prev_kind
    if kind in ("rmsnorm", "layernorm", "rmsnorm1p"):
        w = prev.weight.data
        if kind == "rmsnorm1p":
            w.copy_(((1.0 + w.float()) / s.to(w.device) - 1.0).to(w.dtype))
        else:
            w.copy_((w.float() / s.to(w.device)).to(w.dtype))
        b = getattr(prev, "bias", None)
        if b is not None:
            b.data.copy_((b.data.float() / s.to(b.device)).to(b.dtype))
    elif kind == "linear":
        conv = _is_conv1d(prev, arch)
        view = _wview(prev, conv)
        view[-n:].copy_((view[-n:].float() / s.to(view.device)[:, None]).to(view.dtype))
        b = getattr(prev, "bias", None)
        if b is not None:
            b.data[-n:].copy_((b.data[-n:].float() / s.to(b.device)).to(b.dtype))
    else:
        raise KlaqError(f"unknown prev_kind {kind!r} in toolchain/archs.py (rmsnorm|rmsnorm1p|layernorm|linear)")
    for name in group.linears:
        mod = block.get_submodule(name)
        view = _wview(mod, _is_conv1d(mod, arch))
        view.copy_((view.float() * s_lin.to(view.device)[None, :]).to(view.dtype))


# ---------------------------------------------------------------------------------------------
# one scaling group


def _run_passes(block, inputs, kws, dev, dtype, on_batch) -> None:
    for j, x in enumerate(inputs):
        on_batch(j)
        try:
            block(x.to(device=dev, dtype=dtype), **kws[j])
        except _Stop:
            pass


def _collect_group(block, group: ScaleGroup, inputs, kws, dev, dtype, cfg: AwqConfig, token_wise: bool,
                   gen: torch.Generator):
    """One pass: salience sums over all tokens, and the loss's inspect inputs (a subset)."""
    lin0 = block.get_submodule(group.linears[0])
    insp = block.get_submodule(group.inspect)
    plan = _token_plan(inputs, cfg.loss_tokens, gen) if token_wise else None
    keep = set() if token_wise else set(_batch_subset(inputs, cfg.loss_tokens))
    st = {"j": 0, "lin": False, "insp": False, "sum": None, "count": 0}
    tokens: list[torch.Tensor] = []
    calls: list[tuple] = []

    def lin_hook(_mod, args):
        x = args[0].detach()
        x2 = x.reshape(-1, x.shape[-1]).float()
        part = x2.abs().sum(0) if cfg.salience == "l1" else (x2 * x2).sum(0)
        part = part.double()
        st["sum"] = part if st["sum"] is None else st["sum"] + part
        st["count"] += x2.shape[0]
        if plan is not None:
            tokens.append(x2[plan[st["j"]].to(x2.device)].to(x.dtype))
        st["lin"] = True
        if st["insp"]:
            raise _Stop

    def insp_hook(_mod, args, kwargs):
        if st["j"] in keep:
            calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), _clean_kwargs(kwargs)))
        st["insp"] = True
        if st["lin"]:
            raise _Stop

    def on_batch(j):
        st["j"], st["lin"], st["insp"] = j, False, False

    handles = [lin0.register_forward_pre_hook(lin_hook),
               insp.register_forward_pre_hook(insp_hook, with_kwargs=True)]
    try:
        _run_passes(block, inputs, kws, dev, dtype, on_batch)
    finally:
        for h in handles:
            h.remove()
    if token_wise and tokens:
        calls = [((torch.cat(tokens, 0),), {})]
    return st["sum"], st["count"], calls


def _search_group(block, group: ScaleGroup, arch: QuantArch, inputs, kws, dev, dtype, spec: QuantSpec,
                  cfg: AwqConfig, gen: torch.Generator) -> dict:
    label = f"{group.prev} -> {', '.join(group.linears)}"
    info: dict = {"alpha": None, "duo": None, "loss_rtn": None, "loss": None, "fallback": None, "skipped": None}
    shapes, why = _group_shapes(block, group, arch)
    if shapes is None:
        if not group.optional:
            warnings.warn(f"AWQ: group {label} skipped: {why}", RuntimeWarning, stacklevel=4)
        info["skipped"] = why
        return info
    n_prev, k, index = shapes
    lins = [block.get_submodule(n) for n in group.linears]
    convs = [_is_conv1d(m, arch) for m in lins]
    insp = block.get_submodule(group.inspect)
    token_wise = any(insp is m for m in lins)

    def fallback(reason: str) -> dict:
        warnings.warn(f"AWQ: group {label}: {reason}; keeping the identity scale", RuntimeWarning, stacklevel=5)
        info["fallback"] = reason
        return info

    ssum, count, calls = _collect_group(block, group, inputs, kws, dev, dtype, cfg, token_wise, gen)
    if count == 0 or ssum is None or not calls:
        return fallback("the group's linears received no calibration input")
    x_stat = (ssum / count).float()
    if index is not None:  # o's inputs -> one statistic per v channel (mean over the heads sharing it)
        idx = index.to(x_stat.device)
        x_stat = torch.zeros(n_prev, device=x_stat.device).index_add_(0, idx, x_stat) / \
            torch.bincount(idx, minlength=n_prev).float()
    if cfg.salience == "l2":
        x_stat = x_stat.clamp_min(0).sqrt()
    if not torch.isfinite(x_stat).all():
        return fallback("non-finite input statistics")
    if not (x_stat > 0).any():
        return fallback("all input channels are zero")
    dead = int((x_stat <= 0).sum())
    if dead:
        warnings.warn(f"AWQ: group {label}: {dead} input channel(s) carry no signal; their scale stays 1",
                      RuntimeWarning, stacklevel=4)
        info["dead_channels"] = dead

    w_orig = [_get_w(m, c) for m, c in zip(lins, convs, strict=True)]
    w_stat = weight_salience(w_orig, spec)
    if index is not None:
        idx = index.to(w_stat.device)
        w_stat = torch.zeros(n_prev, device=w_stat.device).index_add_(0, idx, w_stat) / \
            torch.bincount(idx, minlength=n_prev).float()
    refs = []
    for args, kw in calls:
        refs.append(_first(insp(*args, **kw)).float())
    if not all(torch.isfinite(r).all() for r in refs):
        return fallback("non-finite FP output of the inspected module")
    denom = sum(r.numel() for r in refs)

    def loss_for(s: torch.Tensor | None) -> float:
        s_lin = None if s is None else (s if index is None else s[index.to(s.device)])
        for m, c, w in zip(lins, convs, w_orig, strict=True):
            if s_lin is None:
                sc, z = fit_grid(w, spec)
                q = fake_quantize(w, sc, z, spec)
            else:
                ws = w * s_lin[None, :]
                sc, z = fit_grid(ws, spec)
                q = fake_quantize(ws, sc, z, spec) / s_lin[None, :]
            _set_w(m, c, q)
        tot = 0.0
        for (args, kw), ref in zip(calls, refs, strict=True):
            tot += float((_first(insp(*args, **kw)).float() - ref).pow(2).sum())
        return tot / denom

    duos = {True: [True], False: [False], "both": [True, False]}[cfg.duo_scaling]
    try:
        best_loss = loss_for(None)
        info["loss_rtn"] = best_loss
        if not math.isfinite(best_loss):
            best_loss = math.inf
        best = None
        for duo in duos:
            for a in _alphas(cfg.n_grid):
                s = candidate_scales(x_stat, w_stat, a, duo)
                if not duo and a == 0.0:
                    continue  # the identity, already measured
                loss = loss_for(s)
                if math.isfinite(loss) and loss < best_loss:
                    best_loss, best = loss, (a, duo, s)
    finally:
        for m, c, w in zip(lins, convs, w_orig, strict=True):
            _set_w(m, c, w)
    if not math.isfinite(best_loss):
        return fallback("no candidate scale gave a finite loss")
    info["loss"] = best_loss
    if best is None:
        info["alpha"], info["duo"] = 0.0, False
        return info
    a, duo, s = best
    info["alpha"], info["duo"] = a, duo
    fold_scales(block, group, arch, s, index if index is not None and n_prev != k else None)
    return info


# ---------------------------------------------------------------------------------------------
# clip search


def clip_search(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, cfg: AwqConfig):
    """Clamped weights ``[N, K]`` after AutoAWQ's clip search on sampled inputs ``x`` ``[T, K]``.

    Returns ``(w_new, err_before, err_after, frac_clipped)`` where the errors are the layer's
    output MSE under RTN on ``x``, per element, before and after clamping.
    """
    w = w.float()
    x = x.float()
    n, k = w.shape
    gs = spec.groups_for(k)
    g = -(-k // gs)
    gi = torch.arange(k, device=w.device) // gs
    wg = _pad_cols(w, g * gs).view(n, g, gs)
    valid = _pad_cols(torch.ones(1, k, device=w.device), g * gs).view(1, g, gs) > 0
    wmax = wg.masked_fill(~valid, -math.inf).amax(2)
    wmin = wg.masked_fill(~valid, math.inf).amin(2)
    absmax_i = wg.masked_fill(~valid, 0).abs().argmax(2, keepdim=True)
    smax = wg.gather(2, absmax_i).squeeze(2)  # signed max, as the grid sees it
    half = 1 << (spec.bits - 1)
    xg = _pad_cols(x, g * gs).view(-1, g, gs)
    t = xg.shape[0]
    rows = max(1, _CHUNK // max(1, g * t))

    def bounds(r: float):
        if spec.sym:
            m = smax.abs() * r
            other = m * (half - 1) / half
            hi = torch.where(smax >= 0, m, other)
            lo = torch.where(smax >= 0, -other, -m)
        else:
            hi = torch.where(wmax > 0, wmax * r, wmax)
            lo = torch.where(wmin < 0, wmin * r, wmin)
            hi = torch.maximum(hi, lo)
        return lo, hi

    def rtn(wc: torch.Tensor) -> torch.Tensor:
        sc, z = fit_grid(wc, spec)
        return fake_quantize(wc, sc, z, spec)

    def group_err(dw: torch.Tensor) -> torch.Tensor:  # [N, G]: mean_t (sum_j x_tj dw_ij)^2
        dg = _pad_cols(dw, g * gs).view(n, g, gs)
        out = torch.empty(n, g, device=w.device)
        for lo in range(0, n, rows):
            y = torch.einsum("tgj,ngj->ngt", xg, dg[lo : lo + rows])
            out[lo : lo + rows] = y.pow(2).mean(2)
        return out

    n_ratios = max(1, int(round((1.0 - cfg.clip_min_ratio) * cfg.clip_grid)))
    q1 = rtn(w)
    best_err = group_err(q1 - w)
    best_lo = torch.full_like(wmax, -math.inf)
    best_hi = torch.full_like(wmax, math.inf)
    for i in range(1, n_ratios):
        lo, hi = bounds(1.0 - i / cfg.clip_grid)
        wc = torch.minimum(torch.maximum(w, lo[:, gi]), hi[:, gi])
        err = group_err(rtn(wc) - w)
        better = torch.isfinite(err) & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    w_new = torch.minimum(torch.maximum(w, best_lo[:, gi]), best_hi[:, gi])
    # rows whose total output error would grow (cross-group terms) stay unclipped
    row_before = (x @ (q1 - w).t()).pow(2).mean(0)
    row_after = (x @ (rtn(w_new) - w).t()).pow(2).mean(0)
    worse = ~(row_after <= row_before)
    if worse.any():
        w_new[worse] = w[worse]
        row_after = torch.where(worse, row_before, row_after)
    frac = float((torch.isfinite(best_lo) & ~worse[:, None]).float().mean())
    return w_new, float(row_before.mean()), float(row_after.mean()), frac


def _clip_block(block, arch: QuantArch, inputs, kws, dev, dtype, spec: QuantSpec, cfg: AwqConfig,
                gen: torch.Generator) -> dict:
    names = [n for st in arch.stages for n in st if n.rsplit(".", 1)[-1] not in NO_CLIP]
    if not names:
        return {}
    mods = {n: block.get_submodule(n) for n in names}
    plan = _token_plan(inputs, cfg.clip_tokens, gen)
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    st = {"j": 0, "fired": set()}

    def make(name):
        def hook(_mod, args):
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1])
            got[name].append(x2[plan[st["j"]].to(x2.device)].float())
            st["fired"].add(name)
            if len(st["fired"]) == len(names):
                raise _Stop

        return hook

    def on_batch(j):
        st["j"] = j
        st["fired"] = set()

    handles = [mods[n].register_forward_pre_hook(make(n)) for n in names]
    try:
        _run_passes(block, inputs, kws, dev, dtype, on_batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        if not got[n]:
            continue
        x = torch.cat(got[n], 0)
        mod = mods[n]
        conv = _is_conv1d(mod, arch)
        w = _get_w(mod, conv)
        if not (torch.isfinite(x).all() and torch.isfinite(w).all()):
            warnings.warn(f"AWQ: clip search of {n} skipped: non-finite inputs or weights", RuntimeWarning,
                          stacklevel=4)
            continue
        w_new, before, after, frac = clip_search(w, x, spec, cfg)
        _set_w(mod, conv, w_new)
        out[n] = {"err_before": before, "err_after": after, "clipped": frac}
    return out


# ---------------------------------------------------------------------------------------------
# the block


def _block_out(block, x, kw, dev, dtype) -> torch.Tensor:
    return _first(block(x.to(device=dev, dtype=dtype), **kw)).float()


def awq_block(block: nn.Module, inputs: list[torch.Tensor], block_kwargs, arch: QuantArch,
              spec: QuantSpec, cfg=None) -> dict:
    """Search per-group scales, fold them into the previous op, then clip, in place on ``block``.

    ``inputs``: micro-batches of hidden states entering the block, each ``[b, t, hidden]`` (any
    device; moved to the block's). ``block_kwargs``: one dict for all micro-batches, or a list with
    one dict per micro-batch, such that ``block(x, **kw)`` runs the block. ``cfg``: an
    :class:`AwqConfig`, or any config with matching attribute names (the engine's). Returns
    diagnostics: per group the chosen alpha / duo, RTN and best loss, fallbacks; per clipped
    linear the output error before / after; the fold check's relative error.
    """
    with torch.no_grad():
        return _awq_block(block, inputs, block_kwargs, arch, spec, resolve_config(cfg))


def _awq_block(block, inputs, block_kwargs, arch: QuantArch, spec: QuantSpec, acfg: AwqConfig) -> dict:
    p = next(block.parameters())
    dev, dtype = p.device, p.dtype
    kws = list(block_kwargs) if isinstance(block_kwargs, (list, tuple)) else [block_kwargs] * len(inputs)
    if len(kws) != len(inputs):
        raise KlaqError(f"awq_block: {len(inputs)} micro-batches but {len(kws)} kwargs dicts")
    kws = [_clean_kwargs(kw) for kw in kws]
    gen = torch.Generator().manual_seed(acfg.seed)
    diag: dict = {"groups": {}, "clip": {}, "fallbacks": [], "fold_rel_err": None}
    if not inputs:
        return diag

    # snapshot of everything folding can touch, to revert if the fold check fails
    touched = {id(t): t for g in arch.groups for n in (g.prev, *g.linears)
               for t in block.get_submodule(n).parameters(recurse=False)}
    snap = {k: t.detach().to("cpu", copy=True) for k, t in touched.items()} if acfg.verify else {}
    ref = _block_out(block, inputs[0], kws[0], dev, dtype) if acfg.verify else None

    for group in arch.groups:
        info = _search_group(block, group, arch, inputs, kws, dev, dtype, spec, acfg, gen)
        key = f"{group.prev}->{','.join(n.rsplit('.', 1)[-1] for n in group.linears)}"
        diag["groups"][key] = info
        if info["fallback"]:
            diag["fallbacks"].append(f"{key}: {info['fallback']}")

    if acfg.verify:
        out = _block_out(block, inputs[0], kws[0], dev, dtype)
        rel = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
        diag["fold_rel_err"] = rel
        if not (rel <= 1e-3):
            for k, t in touched.items():
                t.data.copy_(snap[k].to(t.device))
            msg = f"folded scales changed the FP block output (relative error {rel:.2e}); scales reverted"
            warnings.warn(f"AWQ: {msg}", RuntimeWarning, stacklevel=3)
            diag["fallbacks"].append(msg)
        del snap

    if acfg.clip:
        diag["clip"] = _clip_block(block, arch, inputs, kws, dev, dtype, spec, acfg, gen)
    return diag
