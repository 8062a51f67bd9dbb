"""Token windows: calibration windows drawn evenly from every source (seeded), and evaluation
windows cut in order."""
from __future__ import annotations

import torch

from submoe_format.texts import DataError, domain_name, read_texts


def token_windows(tokenizer, texts: list[str], seq_len: int, max_windows: int | None = None,
                  eos_id: int | None = None) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into [n, seq_len] windows, in order."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    budget = None if max_windows is None else max_windows * seq_len
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if budget is not None and len(ids) >= budget:
            break
    n = len(ids) // seq_len if max_windows is None else min(len(ids) // seq_len, max_windows)
    if n == 0:
        raise DataError(f"only {len(ids)} tokens of text, fewer than one window of {seq_len}: "
                        "give more text or a smaller --seq-len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def check_token_ids(windows: torch.Tensor, vocab_size: int | None, tokenizer_dir) -> torch.Tensor:
    """An id past the model's embedding table would fail deep inside the forward as a raw
    IndexError: a tokenizer that yields one is not this model's."""
    top = int(windows.max())
    if vocab_size is not None and top >= vocab_size:
        raise DataError(f"the tokenizer in {tokenizer_dir} gives token id {top}, but the model's vocab_size is "
                        f"{vocab_size}: it is not this model's tokenizer (put the model's own tokenizer files beside "
                        f"its config.json)")
    return windows


def source_windows(source, sources: list[str], samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, dict]:
    """`calibration_windows` tokenized by the source checkpoint's own tokenizer, the ids checked
    against its vocabulary (`source`: a LazyCheckpoint)."""
    from transformers import AutoTokenizer
    windows, info = calibration_windows(AutoTokenizer.from_pretrained(str(source.dir)), sources, samples, seq_len, seed)
    check_token_ids(windows, source.config.get("vocab_size"), source.dir)
    return windows, info


def windows_of(source, info: dict) -> torch.Tensor:
    """The calibration windows a run's `info` describes (`source_windows`' info, or a statistics
    file's calibration), drawn again: same files, count, length and seed."""
    return source_windows(source, [s["path"] for s in info["sources"].values()], info["samples"], info["seq_len"],
                          info["seed"])[0]


def calibration_windows(tokenizer, sources: list[str], samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, dict]:
    """`samples` windows of `seq_len` tokens, spread round-robin over the sources (domains)."""
    if samples < 1:
        raise DataError(f"--samples must be at least 1, got {samples}")
    if not sources:
        raise DataError("no calibration data: pass --calib FILE [FILE ...]")
    names = [domain_name(s) for s in sources]
    if len(set(names)) < len(names):  # the report, and whatever draws the windows again, name each source once
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"--calib sources must have different names (a domain is named after its file), but "
                        f"{', '.join(twice)} is given twice: rename or merge those files")
    windows, used = round_robin(shuffled_pools(tokenizer, sources, seq_len, seed), samples)
    info = {"sources": {domain_name(s): {"path": s, "windows": used[i]} for i, s in enumerate(sources)},
            "samples": len(windows), "seq_len": seq_len, "tokens": windows.numel(), "seed": seed,
            "requested_samples": samples}
    return windows, info


def held_out_windows(source, info: dict, count: int) -> torch.Tensor:
    """Up to `count` windows of the calibration text that the calibration `info` describes did not
    draw (each source's shuffled windows after those it used, round-robin), their ids checked
    against the source's vocabulary; [0, seq_len] if none is left."""
    from transformers import AutoTokenizer
    paths = [s["path"] for s in info["sources"].values()]
    pools = shuffled_pools(AutoTokenizer.from_pretrained(str(source.dir)), paths, info["seq_len"], info["seed"])
    used = [s["windows"] for s in info["sources"].values()]
    if round_robin(pools, info["samples"])[1] != used:  # the text changed, or two sources share a name
        raise DataError(f"the calibration text ({', '.join(paths)}) no longer cuts into the windows the "
                        f"calibration drew from it (per source {used}): calibrate again")
    rest = [p[u:] for p, u in zip(pools, used)]
    if not any(len(p) for p in rest):
        return torch.zeros(0, info["seq_len"], dtype=torch.long)
    return check_token_ids(round_robin(rest, count)[0], source.config.get("vocab_size"), source.dir)


def shuffled_pools(tokenizer, sources: list[str], seq_len: int, seed: int) -> list[torch.Tensor]:
    """Each source cut into windows, in a seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    pools = []
    for spec in sources:
        w = token_windows(tokenizer, read_texts(spec), seq_len)
        pools.append(w[torch.randperm(len(w), generator=gen)])
    return pools


def round_robin(pools: list[torch.Tensor], count: int) -> tuple[torch.Tensor, list[int]]:
    """Up to `count` windows taken one from each pool in turn, and how many each pool gave."""
    chosen, used = [], [0] * len(pools)
    while len(chosen) < count and any(used[i] < len(p) for i, p in enumerate(pools)):
        for i, p in enumerate(pools):
            if used[i] < len(p) and len(chosen) < count:
                chosen.append(p[used[i]])
                used[i] += 1
    return torch.stack(chosen), used
