"""Reference-side helpers for comparing vLLM with the torch reference forward."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
LOGPROB_ATOL = 2e-3  # float32 both sides; different kernels and summation order


def assert_matches_reference(got: dict, ref: dict) -> None:
    """Prompt logprobs close at every position; greedy tokens identical (unless the reference
    itself is at a near-tie, where the continuations may legitimately part) with close logprobs."""
    assert len(got["prompt_logprobs"]) == len(ref["prompt_logprobs"])
    for i, (a, b) in enumerate(zip(got["prompt_logprobs"], ref["prompt_logprobs"])):
        if b is not None:
            assert a == pytest.approx(b, abs=LOGPROB_ATOL), f"prompt position {i}"
    for i, (a, b) in enumerate(zip(got["token_ids"], ref["token_ids"])):
        if a != b:
            assert ref["gaps"][i] < LOGPROB_ATOL, f"step {i}: vLLM chose {a}, reference {b} (gap {ref['gaps'][i]:.4f})"
            return
        assert got["logprobs"][i] == pytest.approx(ref["logprobs"][i], abs=LOGPROB_ATOL), f"step {i}"


def assert_same_serving(ours: list[dict], stock: list[dict], atol: float = 1e-5) -> None:
    """The plugin's engine and stock vLLM's agree token for token (same kernels: only the routing path differs)."""
    for a, b in zip(ours, stock, strict=True):
        assert a["token_ids"] == b["token_ids"]
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=atol)
        assert a["prompt_logprobs"][1:] == pytest.approx(b["prompt_logprobs"][1:], abs=atol)


def identity_copy(src: Path, dst: Path) -> Path:
    """The source checkpoint served through the plugin with every map the identity (nothing merged)."""
    from submoe_format.checkpoint import BLOCK_KEY, layout_for, make_block, served_expert_maps
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    layout = layout_for(config)
    n = layout.num_experts(config)
    config.update(architectures=[layout.plugin_architecture], **{BLOCK_KEY: make_block(
        "identity", {"architecture": layout.source_architecture, "num_experts": n}, n, served_expert_maps(config))})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def run_vllm(model: Path | list[Path], prompts: list[list[int]], workdir: Path, max_tokens: int = 12,
             *flags: str) -> subprocess.CompletedProcess:
    (workdir / "prompts.json").write_text(json.dumps(prompts))
    models = [str(m) for m in (model if isinstance(model, list) else [model])]
    return subprocess.run([sys.executable, str(HERE / "vllm_generate.py"), *models, "--prompts",
                           str(workdir / "prompts.json"), "--out", str(workdir / "out.json"),
                           "--max-tokens", str(max_tokens), *flags],
                          capture_output=True, text=True, timeout=1800)


def vllm_results(model: Path | list[Path], prompts: list[list[int]], workdir: Path, max_tokens: int = 12,
                 *flags: str) -> list[dict] | dict[str, list[dict]]:
    """Results of one model, or {model: results} of several (engines run one after another)."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = run_vllm(model, prompts, workdir, max_tokens, *flags)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((workdir / "out.json").read_text())


@torch.no_grad()
def reference_greedy(model, prompt: list[int], max_tokens: int) -> dict:
    """Greedy continuation and logprobs from the torch reference (full recompute per step)."""
    ids = torch.tensor([prompt])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    prompt_lp = [None] + [logp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    tokens, lps, gaps = [], [], []
    for _ in range(max_tokens):
        step = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
        top = step.topk(2)
        t = int(top.indices[0])
        tokens.append(t)
        lps.append(step[t].item())
        gaps.append((top.values[0] - top.values[1]).item())
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return {"token_ids": tokens, "logprobs": lps, "prompt_logprobs": prompt_lp, "gaps": gaps}


def eval_prompts(tokenizer, files: list[str], n_per_file: int = 1, length: int = 24) -> list[list[int]]:
    from submoe_format.texts import read_texts
    prompts = []
    for f in files:
        for text in read_texts(f)[:n_per_file]:
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"][:length])
    return prompts
