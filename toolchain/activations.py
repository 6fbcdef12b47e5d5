"""Calibration activations between decoder blocks: one fp32 tensor per micro-batch, in RAM or on disk.

The engine carries the hidden states of all calibration windows from block to block (DESIGN.md,
"Sequential engine"): 128 x 512 tokens of a 4096-wide model are 1 GiB in fp32, and a block's
inputs and outputs are both alive while it runs. Where that does not fit next to the model, the
micro-batches go to files in a temporary directory instead and are memory-mapped back one at a
time, so RAM holds one micro-batch. Both stores are the same read-only sequence to the engine and
to AWQ (``len``, indexing, iteration), and give the same numbers: files hold the exact tensors.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from klaq.errors import KlaqError

WHERE = ("auto", "cpu", "disk")
RAM_SHARE = 0.5  # auto: disk when a block's inputs + outputs would take more than this share of free RAM


class Activations(Sequence):
    """Append-only list of fp32 CPU tensors, kept in RAM (``cpu``) or in files (``disk``)."""

    def __init__(self, where: str = "cpu", directory: str | None = None):
        if where not in ("cpu", "disk"):
            raise KlaqError(f"activations must be stored on cpu or disk, got {where!r}")
        self._items: list = []
        self._tmp = None
        if where == "disk":
            try:
                self._tmp = tempfile.TemporaryDirectory(prefix="klaq-act-", dir=directory)
            except OSError as exc:
                raise KlaqError(f"cannot create a directory for calibration activations in {directory}: {exc}") \
                    from None

    @property
    def path(self) -> Path | None:
        return Path(self._tmp.name) if self._tmp is not None else None

    def append(self, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", torch.float32).contiguous()
        if self._tmp is None:
            self._items.append(x)
            return
        f = self.path / f"{len(self._items):05d}.pt"
        torch.save(x, f)
        self._items.append(f)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        item = self._items[i]
        if isinstance(item, torch.Tensor):
            return item
        return torch.load(item, mmap=True, weights_only=True)

    def close(self) -> None:
        """Delete the files now (they also go when the store is garbage-collected)."""
        self._items = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def available_ram() -> int:
    """Bytes the kernel reports as available (``MemAvailable``), or 0 when it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def choose_where(where: str, n_tokens: int, hidden: int, streams: int = 1) -> str:
    """``auto`` -> ``disk`` when inputs + outputs (2 x tokens x hidden x fp32, per activation stream)
    exceed RAM_SHARE of free RAM. ``streams`` = 2 with the FP-output fit, which carries the FP
    model's activations beside the quantized model's."""
    if where not in WHERE:
        raise KlaqError(f"--activations must be one of {', '.join(WHERE)}, got {where!r}")
    if where != "auto":
        return where
    need = 2 * streams * n_tokens * hidden * 4
    free = available_ram()
    return "disk" if free and need > RAM_SHARE * free else "cpu"
