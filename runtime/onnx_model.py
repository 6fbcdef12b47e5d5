"""Run an ONNX package with onnxruntime behind the numpy decoder's interface.

:class:`OnnxDecoder` has the same ``new_cache(max_len)`` / ``forward(ids, cache) -> logits [T, vocab]``
methods as :class:`klaq.runtime.model.NumpyDecoder`, so ``generate`` and ``verify`` run either.

With ``GroupQueryAttention`` in the graph (the default), the KV cache is one preallocated
``[1, kv_heads, max_len, head_dim]`` buffer per layer and tensor, bound through IOBinding as both
``past_key_values.N.*`` and ``present.N.*``: onnxruntime appends in place (past/present buffer
sharing), so a decode step copies nothing but its logits. The plain-op graph (Concat) gets the
usual grow-by-concatenation cache.
"""

from __future__ import annotations

import os

import numpy as np

from klaq.errors import KlaqError
from klaq.formats.gguf_package import HParams
from klaq.formats.onnx_package import (
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    OnnxPackageFile,
    read_onnx_package,
)

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class OnnxCache:
    """KV cache for :class:`OnnxDecoder`; ``length`` tokens are cached, at most ``max_len``."""

    def __init__(self, hp: HParams, max_len: int, shared: bool):
        self.length, self.max_len, self.shared = 0, max_len, shared
        n = hp.n_layers
        if shared:
            import onnxruntime as ort

            shape = (1, hp.n_kv_heads, max_len, hp.head_dim)
            self.arrays = [np.zeros(shape, dtype=np.float32) for _ in range(2 * n)]  # k0, v0, k1, v1, ...
            self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]
        else:
            self.arrays = [np.zeros((1, hp.n_kv_heads, 0, hp.head_dim), dtype=np.float32) for _ in range(2 * n)]
        self.binding = None  # the IOBinding with the KV buffers bound (shared mode)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


class OnnxDecoder:
    """A decoder backed by an onnxruntime session on a klaq ONNX graph."""

    def __init__(self, model_path: str, hp: HParams, share_buffer: bool, threads: int | None = None,
                 device: str = "cpu", session_config: dict[str, str] | None = None):
        import onnxruntime as ort

        if device not in PROVIDERS:
            raise KlaqError(f"device {device!r} is not available to the onnxruntime backend; use cpu or cuda")
        providers = PROVIDERS[device]
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise KlaqError("--device cuda needs onnxruntime-gpu (CUDAExecutionProvider is not available)")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        for key, value in (session_config or {}).items():  # e.g. {"session.intra_op.allow_spinning": "0"}
            so.add_session_config_entry(key, str(value))
        try:
            self.session = ort.InferenceSession(model_path, so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise KlaqError(f"onnxruntime cannot load {model_path}: {exc}") from None
        self.hp = hp
        self.share_buffer = share_buffer
        self.device = device
        self.streamed_bytes = 0  # set by load_onnx_package from the manifest

    def weight_bytes_per_step(self) -> int:
        """Weight bytes one decode step reads (generate's bandwidth report)."""
        return self.streamed_bytes

    def kv_bytes_per_step(self, context: int) -> int:
        hp = self.hp
        return 2 * hp.n_layers * hp.n_kv_heads * hp.head_dim * context * 4  # float32 cache

    def new_cache(self, max_len: int) -> OnnxCache:
        return OnnxCache(self.hp, max_len, self.share_buffer)

    def forward(self, ids, cache: OnnxCache) -> np.ndarray:
        """Run ``ids`` (new tokens) through the model, append to ``cache``; logits [T, vocab]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        t = ids.shape[1]
        start, end = cache.length, cache.length + t
        if end > cache.max_len:
            raise ValueError(f"KV cache full: {start} + {t} > {cache.max_len}")
        mask = np.ones((1, end), dtype=np.int64)
        pos = np.arange(start, end, dtype=np.int64)[None]
        if cache.shared:
            logits = self._run_shared(ids, mask, pos, cache)
        else:
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
            for i in range(self.hp.n_layers):
                feeds[PAST_KEY % i], feeds[PAST_VALUE % i] = cache.arrays[2 * i], cache.arrays[2 * i + 1]
            out = self.session.run(None, feeds)
            logits, cache.arrays = out[0], list(out[1:])
        cache.length = end
        return logits[0]

    def _run_shared(self, ids, mask, pos, cache: OnnxCache) -> np.ndarray:
        io = cache.binding
        if io is None:
            io = cache.binding = self.session.io_binding()
            for i in range(self.hp.n_layers):
                for j, (past, present) in enumerate(((PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE))):
                    value = cache.values[2 * i + j]
                    io.bind_ortvalue_input(past % i, value)
                    io.bind_ortvalue_output(present % i, value)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", pos)
        logits = np.empty((1, ids.shape[1], self.hp.vocab_size), dtype=np.float32)  # filled in place
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(io)
        return logits


def load_onnx_package(path: str | os.PathLike, threads: int | None = None, device: str = "cpu",
                      check_hashes: bool = False, session_config: dict[str, str] | None = None,
                      ) -> tuple[OnnxDecoder, OnnxPackageFile]:
    """Open an ONNX package directory: ``(model, file)``.

    ``file`` carries ``hparams``, ``tokenizer`` (TokenizerFacts), ``meta`` (the klaq.* facts),
    ``weight_bytes`` and ``to_dict()``, like the GGUF reader's ``PackageFile``.
    """
    pf = read_onnx_package(path, check_hashes=check_hashes)
    share = bool(pf.manifest["onnx"].get("past_present_share_buffer", False))
    model = OnnxDecoder(pf.model_path, pf.hparams, share, threads=threads, device=device,
                        session_config=session_config)
    model.streamed_bytes = pf.weight_bytes
    return model, pf
