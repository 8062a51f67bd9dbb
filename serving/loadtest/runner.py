"""Drive a server with the `openai` async client: closed loop (N users, each sending its next
request when the last one finished) and open loop (requests sent at given times, whatever
the server's pace). Every request streams, so time to first token and the gaps between
tokens are seen as the user sees them.
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Sequence

import httpx
import openai

from .records import RequestRecord
from .workload import Prompt

Clock = Callable[[], float]
Send = Callable[[Prompt], Awaitable[RequestRecord]]


def async_client(base_url: str, api_key: str | None, concurrency: int, timeout: float = 600) -> openai.AsyncOpenAI:
    # One connection per concurrent user; no retries, so every failure is counted.
    http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=concurrency + 4,
                                                              max_keepalive_connections=concurrency + 4))
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key or "EMPTY", max_retries=0,
                              timeout=timeout, http_client=http)


async def stream_completion(client: openai.AsyncOpenAI, model: str, prompt: Prompt, max_tokens: int,
                            clock: Clock = time.perf_counter) -> RequestRecord:
    """One streamed completion (greedy, ignore_eos: every request decodes `max_tokens`)."""
    record = RequestRecord(start=clock(), end=0.0)
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            # vLLM streams one chunk per decoding step; its text may be empty (a special token,
            # half a UTF-8 character), so a chunk with a choice is a token arrival either way.
            if chunk.choices:
                record.chunk_times.append(clock())
            if chunk.usage is not None:
                record.output_tokens = chunk.usage.completion_tokens
                record.prompt_tokens = chunk.usage.prompt_tokens
    except Exception as e:  # a load test counts failures of any kind; it does not stop at one
        record.error = f"{type(e).__name__}: {e}"
    record.end = clock()
    if record.ok and not record.chunk_times:
        record.error = "EmptyResponse: the stream carried no token"
    return record


async def closed_loop(send: Send, prompts: Sequence[Prompt], concurrency: int,
                      on_done: Callable[[RequestRecord], None] = lambda r: None,
                      clock: Clock = time.perf_counter) -> tuple[list[RequestRecord], float]:
    """`concurrency` users share the prompt list in order; returns records (in prompt order)
    and the wall time from the first send to the last answer."""
    records: list[RequestRecord | None] = [None] * len(prompts)
    queue = iter(range(len(prompts)))

    async def user() -> None:
        for i in queue:  # one shared iterator: each prompt is taken by exactly one user
            records[i] = await send(prompts[i])
            on_done(records[i])

    start = clock()
    await asyncio.gather(*(user() for _ in range(min(concurrency, len(prompts)))))
    return records, clock() - start


async def open_loop(send: Send, prompts: Sequence[Prompt], arrivals: Sequence[float],
                    on_done: Callable[[RequestRecord], None] = lambda r: None,
                    clock: Clock = time.perf_counter, sleep=asyncio.sleep) -> tuple[list[RequestRecord], float]:
    """Send prompt i at `arrivals[i]` seconds after the start, however many are in flight."""
    if len(arrivals) != len(prompts):
        raise ValueError(f"{len(arrivals)} arrival times for {len(prompts)} prompts")
    start = clock()

    async def timed(i: int) -> RequestRecord:
        await sleep(max(0.0, start + arrivals[i] - clock()))
        record = await send(prompts[i])
        on_done(record)
        return record

    records = await asyncio.gather(*(timed(i) for i in range(len(prompts))))
    return list(records), clock() - start
