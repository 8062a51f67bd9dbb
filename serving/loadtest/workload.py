"""The workload: a fixed, seeded prompt set from held-out data, and open-loop arrival times."""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from submoe_format.texts import read_texts

Prompt = str | list[int]  # text, or token ids (exact lengths, for KV-pressure runs)


def held_out_prompts(files: Sequence[str], count: int, length: int, seed: int = 0, tokenizer=None) -> list[Prompt]:
    """`count` windows cut at seeded offsets from the files' texts, domains taking turns.

    `length` is in characters, or in tokens when a tokenizer is given (the prompts are then
    token ids, so every deployment sees exactly `length` prompt tokens).
    """
    if count < 1 or length < 1:
        raise ValueError(f"need count >= 1 and length >= 1, got {count} and {length}")
    rng = random.Random(seed)
    domains = []
    for f in files:
        texts = [t for t in read_texts(f) if t.strip()]
        if tokenizer is None:
            domains.append([t for t in texts if len(t) >= length] or texts)
        else:
            ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
            domains.append([i for i in ids if len(i) >= length] or [sum(ids, [])])
    if not any(domains):
        raise ValueError(f"no text in {list(files)}")
    domains = [d for d in domains if d]
    prompts: list[Prompt] = []
    for i in range(count):
        doc = rng.choice(domains[i % len(domains)])
        start = rng.randrange(max(1, len(doc) - length + 1))
        prompts.append(doc[start:start + length])
    return prompts


def poisson_arrivals(count: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds from the start at which each of `count` requests is sent (exponential gaps)."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=count)
    return np.cumsum(gaps).tolist()
