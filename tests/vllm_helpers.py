"""Reference-side helpers for comparing vLLM with the torch reference forward."""
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run_vllm(model: Path, prompts: list[list[int]], workdir: Path, max_tokens: int = 12) -> subprocess.CompletedProcess:
    (workdir / "prompts.json").write_text(json.dumps(prompts))
    return subprocess.run([sys.executable, str(HERE / "vllm_generate.py"), str(model), str(workdir / "prompts.json"),
                           str(workdir / "out.json"), "--max-tokens", str(max_tokens)],
                          capture_output=True, text=True, timeout=900)


def vllm_results(model: Path, prompts: list[list[int]], workdir: Path, max_tokens: int = 12) -> list[dict]:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = run_vllm(model, prompts, workdir, max_tokens)
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
    from offline.data import read_texts
    prompts = []
    for f in files:
        for text in read_texts(f)[:n_per_file]:
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"][:length])
    return prompts
