"""Server-side measurements: resident memory of the server's processes, and prompt logprobs
for a quality comparison between two deployments on the same prompts."""
from __future__ import annotations

import math
import threading
import time
from typing import Sequence

import openai
import psutil

from .workload import Prompt


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def gpu_bytes(pids: set[int]) -> int | None:
    """GPU memory the given processes hold, from NVML when it is there (CUDA builds of vLLM)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        return None
    total = 0
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        total += sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                     if p.pid in pids)
    return total


def server_memory(pid: int) -> dict:
    """Resident (RSS) and proportional (PSS: shared pages split between sharers, so the sum
    over processes counts each page once) memory of the server and all its descendants."""
    rss = pss = 0
    pids = set()
    for proc in process_tree(pid):
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pids.add(proc.pid)
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return {"rss_bytes": rss, "pss_bytes": pss, "processes": len(pids), "gpu_bytes": gpu_bytes(pids)}


class MemorySampler:
    """Samples `server_memory` every `interval` seconds on a thread while a phase runs."""

    def __init__(self, pid: int | None, interval: float = 1.0):
        self.pid, self.interval = pid, interval
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append({"t": time.time(), **server_memory(self.pid)})
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "MemorySampler":
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.pid is not None:
            self._stop.set()
            self._thread.join()

    def peak(self, key: str = "pss_bytes") -> int | None:
        values = [s[key] for s in self.samples if s.get(key) is not None]
        return max(values) if values else None


def prompt_logprobs(client: openai.OpenAI, model: str, prompts: Sequence[Prompt]) -> list[dict]:
    """Each prompt's token ids, the logprob the model gives each token, and its top-1 token
    (vLLM's `prompt_logprobs`; the first token has no prediction and is left out)."""
    out = []
    for prompt in prompts:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                                      extra_body={"prompt_logprobs": 1, "return_token_ids": True})
        choice = r.choices[0]
        ids, logprobs, top1 = choice.prompt_token_ids[1:], [], []
        for token, entry in zip(ids, choice.prompt_logprobs[1:]):
            logprobs.append(entry[str(token)]["logprob"])
            top1.append(next(int(t) for t, v in entry.items() if v["rank"] == 1))
        out.append({"token_ids": ids, "logprobs": logprobs, "top1": top1})
    return out


def perplexity(scored: Sequence[dict]) -> float:
    lps = [lp for s in scored for lp in s["logprobs"]]
    return math.exp(-sum(lps) / len(lps))


def agreement(reference: Sequence[dict], other: Sequence[dict]) -> dict:
    """Top-1 agreement and mean |Δ logprob| of the observed tokens, position by position.
    Needs both deployments to tokenize the prompts identically (same tokenizer)."""
    if [s["token_ids"] for s in reference] != [s["token_ids"] for s in other]:
        return {"comparable": False, "reason": "the deployments tokenize the prompts differently"}
    pairs = [(a, b) for r, o in zip(reference, other) for a, b in zip(zip(r["top1"], r["logprobs"]),
                                                                        zip(o["top1"], o["logprobs"]))]
    return {"comparable": True, "positions": len(pairs),
            "top1_agreement": sum(a[0] == b[0] for a, b in pairs) / len(pairs),
            "mean_abs_logprob_diff": sum(abs(a[1] - b[1]) for a, b in pairs) / len(pairs)}
