"""`submoe loadtest`: drive the same seeded workload against each deployment in turn, or, with
`--rounds N`, against all of them up at once in N alternating rounds (interleave.py).

    submoe loadtest models/tiny-mixtral-8e demo-out/tiny-mixtral-submoe-4e --data data/eval/*.jsonl \\
        --labels original,compressed --concurrency 1,4,16,64 --rate 4 --out loadtest-out

A deployment is a model directory (served with `vllm serve` on 127.0.0.1 for the run, then
stopped) or the URL of a running OpenAI-compatible server.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from submoe_format.errors import SubMoEError

from ..client import client_for, served_model
from ..launcher import VLLMServer, bearer
from ..scrape import compression_description, compression_gauges, engine_counters, metric_samples
from . import probes, report
from .interleave import round_ratios, run_rounds
from .records import RequestRecord, after_warmup, growth, summarize
from .runner import async_client, closed_loop, open_loop, stream_completion
from .workload import held_out_prompts, poisson_arrivals

MAX_PROMPTS = 512  # distinct prompts; a longer run (a soak) cycles through them again


class LoadTestError(SubMoEError):
    """A load test that cannot run as asked (bad deployment, labels or options)."""


@dataclass
class LoadTestOptions:
    targets: list[str]
    labels: list[str]
    data: list[str]
    out: Path
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    requests: int | None = None  # per concurrency level; default max(min_requests, waves x concurrency)
    waves: int = 4
    min_requests: int = 16
    rate: float | None = None  # open loop, requests/s
    rate_requests: int = 64
    max_tokens: int = 64
    prompt_length: int = 400
    prompt_tokens: bool = False  # prompt_length counts tokens (needs a local tokenizer) instead of characters
    quality_prompts: int = 16
    soak_requests: int = 0
    soak_concurrency: int = 32
    api_key: str | None = None
    serve_args: list[str] = field(default_factory=list)
    target_serve_args: list[list[str]] | None = None  # per deployment, after serve_args (e.g. each its KV budget)
    host: str = "127.0.0.1"
    seed: int = 0
    rounds: int = 1  # > 1: all deployments up at once, closed-loop phases in alternating rounds
    force: bool = False  # replace the load-test files already in `out`
    progress: bool = True

    def requests_at(self, concurrency: int) -> int:
        return self.requests or max(self.min_requests, self.waves * concurrency)

    def measured_requests(self) -> int:
        """Requests of the timed phases: the sweep, the open loop and the soak."""
        return sum(self.requests_at(c) for c in self.concurrency) + (self.rate_requests if self.rate else 0) \
            + self.soak_requests

    def check(self) -> None:
        """Refuse what cannot run, before any server starts."""
        if len(self.labels) != len(self.targets):
            raise LoadTestError(f"{len(self.labels)} labels for {len(self.targets)} deployments")
        if self.target_serve_args is not None and len(self.target_serve_args) != len(self.targets):
            raise LoadTestError(f"{len(self.target_serve_args)} per-deployment serve argument lists for "
                                f"{len(self.targets)} deployments")
        positive = {"--max-tokens": self.max_tokens, "--prompt-length": self.prompt_length,
                    "--quality-prompts": self.quality_prompts, "--rate-requests": self.rate_requests,
                    "--soak-concurrency": self.soak_concurrency, "--requests": self.requests or 1,
                    "--rate": self.rate if self.rate is not None else 1}
        for flag, value in positive.items():
            if value <= 0:
                raise LoadTestError(f"{flag} must be > 0, got {value}")
        if self.soak_requests < 0:
            raise LoadTestError(f"--soak-requests must be >= 0, got {self.soak_requests}")
        if self.rounds < 1:
            raise LoadTestError(f"--rounds must be >= 1, got {self.rounds}")
        if self.rounds > 1 and (self.rate or self.soak_requests):
            raise LoadTestError("--rounds interleaves the closed-loop levels only: run --rate / --soak-requests "
                                "without --rounds")
        for target in self.targets:  # all of them now, not after the first has been measured
            if not is_url(target) and not Path(target).is_dir():
                raise LoadTestError(f"deployment {target!r} is neither a model directory nor an http(s):// URL")
        existing = [f.name for f in report.output_paths(self.out).values() if f.exists()]
        if existing and not self.force:
            raise LoadTestError(f"{self.out} already holds load-test results ({', '.join(existing)}): "
                                "pass another --out, or --force to replace them")


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


@contextlib.contextmanager
def deployment(target: str, opts: LoadTestOptions, log: Path, extra: list[str] = ()):
    """(base URL, server pid or None, start-up seconds or None) while the deployment is up."""
    if is_url(target):
        yield target.rstrip("/"), None, None
        return
    t0 = time.perf_counter()
    with VLLMServer(target, *opts.serve_args, *extra, host=opts.host, api_key=opts.api_key, log_path=log) as server:
        yield server.base_url, server.pid, time.perf_counter() - t0


def gpu_share(serve_args: list[str], deployments: int, on_gpu: bool) -> list[str]:
    """Serve arguments that let `deployments` servers share one GPU: vLLM takes 90% of a GPU's memory
    by default and refuses to start where less is free, so each gets an equal part of 90% (unless the
    user chose a share)."""
    if not on_gpu or deployments < 2 or any(a.split("=")[0] == "--gpu-memory-utilization" for a in serve_args):
        return []
    return ["--gpu-memory-utilization", f"{0.9 / deployments:.3f}"]


def cuda_visible() -> bool:
    import torch
    return torch.cuda.is_available()


def run_phase(base_url: str, api_key: str | None, model: str, prompts: list, max_tokens: int, bar: tqdm | None,
               concurrency: int | None = None, arrivals: list[float] | None = None) -> dict:
    on_done = (lambda r: bar.update()) if bar is not None else (lambda r: None)

    async def go():
        client = async_client(base_url, api_key, concurrency or len(prompts))
        send = lambda p: stream_completion(client, model, p, max_tokens)  # noqa: E731
        try:
            if arrivals is None:
                return await closed_loop(send, prompts, concurrency, on_done=on_done)
            return await open_loop(send, prompts, arrivals, on_done=on_done)
        finally:
            await client.close()
    records, duration = asyncio.run(go())
    return {**summarize(records, duration), "records": [r.to_json() for r in records]}


def describe(label: str, base_url: str, pid: int | None, prompts: list, opts: LoadTestOptions,
             reference_logprobs: list[dict] | None) -> tuple[dict, list[dict]]:
    """What a running deployment is, untimed: its compression and engine facts, quality on the
    first prompts (which double as its warm-up), and idle memory."""
    headers = bearer(opts.api_key)
    client = client_for(base_url, opts.api_key or "EMPTY")
    model = served_model(client)
    samples = metric_samples(base_url, headers)
    result = {"label": label, "base_url": base_url, "model": model,
              "compression": compression_gauges(base_url, samples=samples),
              "engine": engine_counters(base_url, samples=samples),
              "description": compression_description(base_url, headers)}

    scored = probes.prompt_logprobs(client, model, prompts[:opts.quality_prompts])
    result["quality"] = {"perplexity": probes.perplexity(scored), "prompts": len(scored)}
    if reference_logprobs is not None:
        result["quality"].update(probes.agreement(reference_logprobs, scored))

    idle = probes.server_memory(pid) if pid else None
    result["memory"] = {"idle_pss_bytes": idle and idle["pss_bytes"], "idle_rss_bytes": idle and idle["rss_bytes"],
                        "gpu_bytes": idle and idle["gpu_bytes"]}
    return result, scored


def measure(label: str, base_url: str, pid: int | None, prompts: list, opts: LoadTestOptions,
            reference_logprobs: list[dict] | None) -> tuple[dict, list[dict]]:
    """Everything the load test records about one running deployment."""
    result, scored = describe(label, base_url, pid, prompts, opts, reference_logprobs)
    model, headers = result["model"], bearer(opts.api_key)
    # Each phase takes fresh prompts (the same ones on every deployment), so no phase finds its
    # prompts in vLLM's prefix cache from an earlier one; the quality prompts double as warm-up.
    take = _prompt_slices(prompts, start=opts.quality_prompts)
    with tqdm(total=opts.measured_requests(), desc=label, unit="req", disable=not opts.progress, dynamic_ncols=True) as bar:
        run_phase(base_url, opts.api_key, model, prompts[:2], opts.max_tokens, None, concurrency=1)  # warm-up
        with probes.MemorySampler(pid) as sampler:
            result["closed_loop"] = []
            for c in opts.concurrency:
                bar.set_postfix_str(f"concurrency {c}")
                phase = run_phase(base_url, opts.api_key, model, take(opts.requests_at(c)),
                                   opts.max_tokens, bar, concurrency=c)
                result["closed_loop"].append({"concurrency": c, **phase})
            if opts.rate:
                bar.set_postfix_str(f"open loop {opts.rate:g}/s")
                arrivals = poisson_arrivals(opts.rate_requests, opts.rate, opts.seed)
                phase = run_phase(base_url, opts.api_key, model, take(opts.rate_requests),
                                   opts.max_tokens, bar, arrivals=arrivals)
                result["open_loop"] = {"rate": opts.rate, **phase}
        if opts.soak_requests:
            bar.set_postfix_str(f"soak at {opts.soak_concurrency}")
            result["soak"] = soak(base_url, pid, model, take(opts.soak_requests), opts, bar)
    after = engine_counters(base_url, headers)
    result["engine"]["preemptions_during_run"] = after["preemptions"] - result["engine"]["preemptions"]
    result["memory"].update(peak_pss_bytes=sampler.peak("pss_bytes"), peak_rss_bytes=sampler.peak("rss_bytes"))
    return result, scored


def measure_interleaved(ups: list[tuple[str, int | None, float | None]], prompts: list,
                        opts: LoadTestOptions) -> tuple[list[dict], list[dict]]:
    """All deployments up at once (`ups`: base URL, pid, start-up seconds each): each described in
    turn, then the closed-loop levels in `opts.rounds` alternating rounds (interleave.py). Each
    deployment's closed_loop pools its rounds' requests; its `rounds` keeps the per-round figures.
    Returns (deployments, each against the first: per-concurrency ratios over the rounds)."""
    deployments, reference = [], None
    for (base_url, pid, _), label in zip(ups, opts.labels):
        d, scored = describe(label, base_url, pid, prompts, opts, reference)
        reference = reference if reference is not None else scored
        deployments.append(d)
    take = _prompt_slices(prompts, start=opts.quality_prompts)
    records: dict[tuple[int, int], list[dict]] = {}
    with tqdm(total=opts.rounds * sum(opts.requests_at(c) for c in opts.concurrency) * len(ups), unit="req",
              desc=f"{opts.rounds} interleaved rounds", disable=not opts.progress, dynamic_ncols=True) as bar:
        def phase(i: int, batch: list, c: int) -> dict:
            out = run_phase(ups[i][0], opts.api_key, deployments[i]["model"], batch, opts.max_tokens, bar, concurrency=c)
            records.setdefault((i, c), []).append(out)
            return out
        for (base_url, _, _), d in zip(ups, deployments):  # warm-up
            run_phase(base_url, opts.api_key, d["model"], prompts[:2], opts.max_tokens, None, concurrency=1)
        rounds = run_rounds(len(ups), opts.rounds, opts.concurrency, take, opts.requests_at, phase)
    for i, ((base_url, _, _), d) in enumerate(zip(ups, deployments)):
        d["rounds"] = rounds[i]
        d["closed_loop"] = []
        for c in opts.concurrency:
            phases = records[(i, c)]
            pooled = [RequestRecord(**r) for p in phases for r in p["records"]]
            d["closed_loop"].append({"concurrency": c, **summarize(pooled, sum(p["duration_s"] for p in phases))})
        after = engine_counters(base_url, bearer(opts.api_key))
        d["engine"]["preemptions_during_run"] = after["preemptions"] - d["engine"]["preemptions"]
    versus = [{"label": d["label"], "versus": deployments[0]["label"], "ratios": round_ratios(r, rounds[0])}
              for d, r in zip(deployments[1:], rounds[1:])]
    return deployments, versus


def soak(base_url: str, pid: int | None, model: str, prompts: list, opts: LoadTestOptions, bar: tqdm) -> dict:
    """Many requests at one concurrency; failures and memory growth after the first 20%."""
    with probes.MemorySampler(pid, interval=0.5) as sampler:
        phase = run_phase(base_url, opts.api_key, model, prompts, opts.max_tokens,
                           bar, concurrency=opts.soak_concurrency)
    series = [s["pss_bytes"] for s in sampler.samples]
    phase.pop("records")
    warm = after_warmup(series) or [None]
    return {**phase, "concurrency": opts.soak_concurrency, "memory_series_pss_bytes": series,
            "memory_growth": growth(series), "memory_after_warmup": warm[0], "memory_peak": max(warm, default=None)}


def _prompt_slices(prompts: list, start: int):
    """take(n): the next n prompts after `start`, wrapping around when the set runs out."""
    stream = itertools.islice(itertools.cycle(prompts), start, None)
    return lambda n: list(itertools.islice(stream, n))


def run(opts: LoadTestOptions) -> dict:
    opts.check()
    tokenizer = None
    if opts.prompt_tokens:
        local = [t for t in opts.targets if not is_url(t)]
        if not local:
            raise LoadTestError("--prompt-tokens needs a local model directory to take the tokenizer from")
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(local[0])
    need = opts.quality_prompts + opts.measured_requests() * opts.rounds
    prompts = held_out_prompts(opts.data, min(need, MAX_PROMPTS), opts.prompt_length, opts.seed, tokenizer)
    result = {"config": {"targets": opts.targets, "labels": opts.labels, "data": opts.data,
                         "concurrency": opts.concurrency, "requests": {c: opts.requests_at(c) for c in opts.concurrency},
                         "rate": opts.rate, "rate_requests": opts.rate_requests, "max_tokens": opts.max_tokens,
                         "prompts": len(prompts), "prompt_length": opts.prompt_length,
                         "prompt_unit": "tokens" if tokenizer else "characters", "seed": opts.seed,
                         "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
              "deployments": []}
    result["config"]["rounds"] = opts.rounds
    opts.out.mkdir(parents=True, exist_ok=True)
    log = lambda label: opts.out / f"serve-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.log"  # noqa: E731
    if opts.rounds > 1:
        share = gpu_share(opts.serve_args, sum(not is_url(t) for t in opts.targets), cuda_visible())
        with contextlib.ExitStack() as up:
            ups = [up.enter_context(deployment(t, opts, log(label), [*share, *extra])) for t, label, extra in
                   zip(opts.targets, opts.labels, opts.target_serve_args or [[]] * len(opts.targets))]
            result["deployments"], result["interleaved"] = measure_interleaved(ups, prompts, opts)
        for d, target, (_, _, startup) in zip(result["deployments"], opts.targets, ups):
            d.update(target=target, startup_s=startup)
    reference = None
    for target, label, extra in zip(opts.targets, opts.labels, opts.target_serve_args or [[]] * len(opts.targets)) \
            if opts.rounds == 1 else ():
        with deployment(target, opts, log(label), extra) as (base_url, pid, startup):
            d, scored = measure(label, base_url, pid, prompts, opts, reference)
        d.update(target=target, startup_s=startup)
        reference = reference if reference is not None else scored
        result["deployments"].append(d)
    result["paths"] = {k: str(v) for k, v in report.write(result, opts.out).items()}
    return result


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="+", metavar="DEPLOYMENT", help="model directory or http(s):// URL, one or more")
    p.add_argument("--labels", help="comma-separated names, one per deployment (default: directory names)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="held-out .jsonl/.txt files (or hf:DATASET[:CONFIG[:SPLIT]]) the prompts are cut from, "
                        "e.g. --data data/eval/*.jsonl")
    p.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 64], help="closed-loop levels (default 1,4,16,64)")
    p.add_argument("--requests", type=int, help="requests per level (default max(16, 4 x concurrency))")
    p.add_argument("--rate", type=float, help="also an open-loop Poisson run at this many requests/s")
    p.add_argument("--rate-requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    p.add_argument("--prompt-length", type=int, default=400, help="prompt characters (default 400)")
    p.add_argument("--prompt-tokens", action="store_true", help="--prompt-length counts tokens, not characters")
    p.add_argument("--quality-prompts", type=int, default=16, help="prompts scored for perplexity/agreement")
    p.add_argument("--soak-requests", type=int, default=0, help="after the sweep: this many requests ...")
    p.add_argument("--soak-concurrency", type=int, default=32, help="... at this concurrency (default 32)")
    p.add_argument("--api-key", help="sent to URL deployments; passed to `vllm serve --api-key` for directories")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra `vllm serve` argument for directories (repeat: --serve-arg=--dtype --serve-arg=float32)")
    p.add_argument("--host", default="127.0.0.1", help="address `vllm serve` binds (default 127.0.0.1)")
    p.add_argument("--out", type=Path, default=Path("loadtest-out"), help="results directory (kept unless --force)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1,
                   help="N > 1: all deployments up at once, the closed-loop levels measured in N rounds in rotating "
                        "order; ratios per round with their median and spread (believable on a drifting machine)")
    p.add_argument("--force", action="store_true", help="replace load-test results already in --out")
    p.add_argument("--no-progress", action="store_true")


def options_from(args: argparse.Namespace) -> LoadTestOptions:
    labels = args.labels.split(",") if args.labels else [t.rstrip("/").rsplit("/", 1)[-1] for t in args.targets]
    return LoadTestOptions(
        targets=args.targets, labels=labels, data=args.data, out=args.out, concurrency=args.concurrency,
        requests=args.requests, rate=args.rate, rate_requests=args.rate_requests, max_tokens=args.max_tokens,
        prompt_length=args.prompt_length, prompt_tokens=args.prompt_tokens, quality_prompts=args.quality_prompts,
        soak_requests=args.soak_requests, soak_concurrency=args.soak_concurrency, api_key=args.api_key,
        serve_args=args.serve_arg, host=args.host, seed=args.seed, rounds=args.rounds, force=args.force,
        progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    """`submoe loadtest ARGS` (argv: what follows `loadtest`). A user error is raised as a
    `SubMoEError` (a `LoadTestError`, `ServerError`, `DataError`, ...) for `submoe`'s one handler."""
    p = argparse.ArgumentParser(prog="submoe loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    result = run(options_from(p.parse_args(argv)))
    print(report.summary_table(result))
    print(f"wrote {result['paths']['markdown']}, {result['paths']['json']}, {result['paths']['plot']}")
    return 0
