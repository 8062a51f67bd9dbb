"""Calibration hidden states between decoder layers, in RAM or spilled to disk.

A layer reads its input [S, L, H] and writes its output batch by batch, so the compressor never
needs more than one batch of activations in memory beyond the store itself; a store over the
memory budget lives in a raw float32 file instead (read and written with plain file I/O, not
mmap, so its pages are not counted as the process's resident memory). Files also let a killed
run resume from the activations after its last finished layer.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch


class Activations:
    """A float32 [S, L, H] tensor addressed by window ranges: `read(a, b)` / `write(a, values)`."""

    def __init__(self, shape: tuple[int, int, int], path: Path | None = None, tensor: torch.Tensor | None = None):
        self.shape = tuple(shape)
        self.path = path
        self.tensor = tensor
        if tensor is None and path is None:
            self.tensor = torch.empty(self.shape, dtype=torch.float32)
        if path is not None and not path.exists():
            with path.open("wb") as f:
                f.truncate(math.prod(self.shape) * 4)

    @classmethod
    def create(cls, shape: tuple[int, int, int], directory: Path, name: str, budget_bytes: int) -> "Activations":
        """In RAM when it fits the budget, else a file `name` in `directory`."""
        if math.prod(shape) * 4 <= budget_bytes:
            return cls(shape)
        return cls(shape, path=directory / name)

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def _window_bytes(self) -> int:
        return self.shape[1] * self.shape[2] * 4

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[start:stop]
        count = (stop - start) * self.shape[1] * self.shape[2]
        data = np.fromfile(self.path, dtype=np.float32, count=count, offset=start * self._window_bytes())
        return torch.from_numpy(data).view(stop - start, *self.shape[1:])

    def write(self, start: int, values: torch.Tensor) -> None:
        values = values.detach().to("cpu", torch.float32).contiguous()
        if self.tensor is not None:
            self.tensor[start:start + len(values)] = values
            return
        with self.path.open("r+b") as f:
            f.seek(start * self._window_bytes())
            f.write(values.numpy().tobytes())

    def save_as(self, path: Path) -> None:
        """Copy to `path` atomically (a resumable run's activations after its last finished layer)."""
        tmp = path.with_name(path.name + ".tmp")
        if self.on_disk:
            shutil.copyfile(self.path, tmp)
        else:
            self.tensor.numpy().tofile(tmp)
        tmp.replace(path)
