"""Shared fixtures: the shipped model, random fixtures built from it, checkpoint helpers."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
             "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(k, v)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "tiny-mixtral-8e"
CALIB = sorted(str(p) for p in (ROOT / "data" / "calib").glob("*.jsonl"))
EVAL = sorted(str(p) for p in (ROOT / "data" / "eval").glob("*.jsonl"))


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def write_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config, indent=2))


def sample_stats(experts, tokens, logits):
    """Calibration statistics of a layer whose calibration tokens are exactly `tokens` (Mixtral top-2)."""
    from reference import stats_from_sample

    from offline.moe_math import Routing
    return stats_from_sample(tokens, experts, logits, Routing(2), samples=64)


def random_layer(seed=0, n=8, h=16, i=24, t=64, router_gain=1.0):
    """One random MoE layer's experts and the calibration statistics a router over them gives: logits
    from a random router on random tokens, frequency and every other statistic accumulated from
    those tokens as calibration does (so frequency, gate weights and logits agree)."""
    import torch

    from offline.moe_math import Experts
    g = torch.Generator().manual_seed(seed)
    experts = Experts(torch.randn(n, i, h, generator=g), torch.randn(n, i, h, generator=g),
                      torch.randn(n, h, i, generator=g))
    tokens = torch.randn(t, h, generator=g)
    logits = tokens @ (torch.randn(n, h, generator=g) * router_gain / h ** 0.5).T
    return experts, sample_stats(experts, tokens, logits)


@pytest.fixture(scope="session")
def prompts():
    """One 24-token prompt from every held-out domain, as token ids (shipped tokenizer)."""
    from transformers import AutoTokenizer
    from vllm_helpers import eval_prompts
    return eval_prompts(AutoTokenizer.from_pretrained(str(SHIPPED)), EVAL)


@pytest.fixture(scope="session")
def random_source(tmp_path_factory) -> Path:
    """A 2-layer, 8-expert random Mixtral (float32) with the shipped tokenizer."""
    from offline.synthetic import random_mixtral
    return random_mixtral(tmp_path_factory.mktemp("random") / "src", SHIPPED)


@pytest.fixture(scope="session")
def random_compressed(tmp_path_factory, random_source) -> Path:
    from offline.compress import compress
    from offline.options import CompressOptions
    out = tmp_path_factory.mktemp("random-4e") / "out"
    compress(CompressOptions(model=str(random_source), out=out, method="submoe", num_experts=4,
                             calib=CALIB[:2], samples=8, seq_len=64, progress=False))
    return out
