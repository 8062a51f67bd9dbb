"""What one request took, and the statistics over many (pure: no clock, no I/O)."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """Times in seconds on one monotonic clock; `chunk_times` are when streamed text arrived."""

    start: float
    end: float
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None  # exception class and message, None when the request succeeded

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def inter_token_latencies(self) -> list[float]:
        return np.diff(self.chunk_times).tolist()

    @property
    def e2e(self) -> float:
        return self.end - self.start

    def to_json(self) -> dict:
        return asdict(self)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99 and the mean (numpy's linear interpolation, as `vllm bench serve`)."""
    if len(values) == 0:
        return {**{f"p{p}": None for p in PERCENTILES}, "mean": None}
    arr = np.asarray(values, dtype=float)
    return {**{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}, "mean": float(arr.mean())}


def summarize(records: Sequence[RequestRecord], duration: float) -> dict:
    """Latency percentiles over the successful requests; rates over the phase's wall time."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    ok = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": dict(Counter(r.error.split(":", 1)[0] for r in records if not r.ok)),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration,
        "output_tokens_per_s": output_tokens / duration,
        "output_tokens": output_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": percentiles([x for r in ok for x in r.inter_token_latencies]),
        "e2e_s": percentiles([r.e2e for r in ok]),
    }


def after_warmup(samples: Sequence[float], warmup_fraction: float = 0.2) -> list[float]:
    """The samples after the first `warmup_fraction` of the series."""
    return list(samples)[int(len(samples) * warmup_fraction):]


def growth(samples: Sequence[float], warmup_fraction: float = 0.2) -> float | None:
    """Relative growth of a memory series after warm-up: the largest sample after it over the
    first one after it, minus 1 (a leak shows as steady growth; noise stays near 0)."""
    after = after_warmup(samples, warmup_fraction)
    if len(after) < 2 or after[0] <= 0:
        return None
    return max(after) / after[0] - 1
