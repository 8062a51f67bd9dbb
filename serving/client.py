"""Timed requests against an OpenAI-compatible server, with the `openai` client."""
from __future__ import annotations

import time
from dataclasses import dataclass

import openai


@dataclass
class StreamTiming:
    ttft: float  # seconds to the first generated token
    e2e: float  # seconds to the last
    output_tokens: int

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.output_tokens - 1) / (self.e2e - self.ttft) if self.output_tokens > 1 and self.e2e > self.ttft else 0.0


def client_for(base_url: str, api_key: str = "EMPTY") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=300)


def served_model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def timed_completion(client: openai.OpenAI, model: str, prompt, max_tokens: int) -> StreamTiming:
    """Stream one completion (ignore_eos so every run decodes the same number of tokens)."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return StreamTiming(ttft=(first or end) - start, e2e=end - start, output_tokens=tokens)
