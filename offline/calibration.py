"""Calibration windows: token windows drawn evenly from every calibration source, seeded."""
from __future__ import annotations

import torch

from .data import DataError, domain_name, read_texts, token_windows


def calibration_windows(tokenizer, sources: list[str], samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, dict]:
    """`samples` windows of `seq_len` tokens, spread round-robin over the sources (domains)."""
    if samples < 1:
        raise DataError(f"--samples must be at least 1, got {samples}")
    if not sources:
        raise DataError("no calibration data: pass --calib FILE [FILE ...]")
    gen = torch.Generator().manual_seed(seed)
    pools = []
    for spec in sources:
        w = token_windows(tokenizer, read_texts(spec), seq_len)
        pools.append(w[torch.randperm(len(w), generator=gen)])
    chosen, used = [], [0] * len(pools)
    while len(chosen) < samples and any(used[i] < len(p) for i, p in enumerate(pools)):
        for i, p in enumerate(pools):
            if used[i] < len(p) and len(chosen) < samples:
                chosen.append(p[used[i]])
                used[i] += 1
    windows = torch.stack(chosen)
    info = {"sources": {domain_name(s): {"path": s, "windows": used[i]} for i, s in enumerate(sources)},
            "samples": len(windows), "seq_len": seq_len, "tokens": windows.numel(), "seed": seed,
            "requested_samples": samples}
    return windows, info
