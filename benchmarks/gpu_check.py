"""What `make gpu-check` verifies on an NVIDIA GPU beyond the test suite: compressed checkpoints served
compiled (torch.compile and CUDA graphs on, as `vllm serve` runs by default) against transformers'
reference forward, and composed with vLLM's online FP8.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu] [--work build/gpu-check]

1. compiled     the shipped Mixtral 8->4 and the fine-grained Qwen2-MoE 64->32 (shared expert), Sub-MoE,
                remap export, and the Mixtral 8->4 by MoNE (constant experts: the plugin's correction
                op inside the CUDA graph), served in float32 without --enforce-eager: greedy tokens and
                the prompt's logprobs against the reference forward of the merged model.
2. fp8          the same checkpoints, and the Mixtral's `--export vanilla` (stock vLLM, no plugin), served
                in bf16 with and without `--quantization fp8`: agreement of greedy tokens and the
                prompt logprobs' difference (FP8's cost on top of the merge).
3. parallel     on 2 GPUs: the Qwen2-MoE 64->32 (shared expert) and a Mixtral with per-layer counts 5/3/4/7
                (uneven expert slices per rank) served with tensor parallel 2, and with expert parallel
                (TP 2 + --enable-expert-parallel: global merged ids through vLLM's expert map), and TP 2
                under Ray (the executor that spans machines: the plugin registers in Ray's workers),
                against the same checkpoint on one GPU. Skipped, with the reason, on fewer than 2 GPUs.

Runs anywhere vLLM runs (on a CPU, step 2 is skipped where vLLM has no FP8 kernels). Writes
gpu_check.json and gpu_check.md under --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import harness
from harness import CALIB, EVAL, ROOT

from offline.compress import compress
from offline.options import CompressOptions

MODELS = {"mixtral 8->4": (ROOT / "models" / "tiny-mixtral-8e", 4),
          "qwen2-moe 64->32": (ROOT / "models" / "tiny-qwen2-moe-64e", 32),
          "mixtral 8->5/3/4/7": (ROOT / "models" / "tiny-mixtral-8e", [5, 3, 4, 7]),
          "mixtral 8->4 mone": (ROOT / "models" / "tiny-mixtral-8e", 4)}
COMPILED = ("mixtral 8->4", "qwen2-moe 64->32", "mixtral 8->4 mone")  # served compiled against the reference
PARALLEL = {"tp2": "tensor_parallel_size=2", "ep2": "tensor_parallel_size=2,enable_expert_parallel=true",
            "tp2-ray": "tensor_parallel_size=2,distributed_executor_backend=ray"}  # Ray: how vLLM spans nodes
PROMPTS, PROMPT_LEN, NEW_TOKENS = 8, 24, 12


def machine() -> dict:
    import torch

    from vllm_submoe.vllm_compat import vllm_version
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {**harness.machine(), "gpu": gpu, "vllm": vllm_version(), "cuda": torch.version.cuda}


def build(work: Path) -> dict[str, dict[str, Path]]:
    """Each model compressed with Sub-MoE (or MoNE), exported remap (and the Mixtral vanilla); reused when present."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name, (src, n) in MODELS.items():
        exports = ("remap", "vanilla") if name == "mixtral 8->4" else ("remap",)
        out[name] = {"source": src}
        for export in exports:
            count = n if isinstance(n, int) else "-".join(map(str, n))
            method = "mone" if name.endswith("mone") else "submoe"
            dst = work / f"{src.name}-{count}e-{method}-{export}"
            if not (dst / "config.json").exists():
                compress(CompressOptions(model=str(src), out=dst, method=method, num_experts=n, export=export,
                                         calib=CALIB, samples=64, seq_len=128, device=device, force=True,
                                         progress=False))
            out[name][export] = dst
    return out


def prompts(tokenizer_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from submoe_format.texts import read_texts
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = [t[:1000] for f in EVAL for t in read_texts(f)[:1]][:PROMPTS]  # a prompt is its first tokens
    return [tok(t, add_special_tokens=False)["input_ids"][:PROMPT_LEN] for t in texts]


def served(models: list[Path], ids: list[list[int]], work: Path, *flags: str) -> dict[str, list[dict]]:
    """vLLM's greedy tokens and logprobs for each model (tests/vllm_generate.py, one subprocess)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "prompts.json").write_text(json.dumps(ids))
    cmd = [sys.executable, str(ROOT / "tests" / "vllm_generate.py"), *map(str, models), "--prompts",
           str(work / "prompts.json"), "--out", str(work / "out.json"), "--max-tokens", str(NEW_TOKENS), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (work / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads((work / "out.json").read_text())
    return out if len(models) > 1 else {str(models[0]): out}


def agreement(a: list[dict], b: list[dict]) -> dict:
    """Greedy continuations and prompt logprobs of two runs on the same prompts."""
    same = sum(x["token_ids"] == y["token_ids"] for x, y in zip(a, b))
    matched = sum(next((i for i, (s, t) in enumerate(zip(x["token_ids"], y["token_ids"])) if s != t),
                       len(x["token_ids"])) for x, y in zip(a, b))
    diffs = [abs(p - q) for x, y in zip(a, b) for p, q in zip(x["prompt_logprobs"][1:], y["prompt_logprobs"][1:])]
    return {"prompts": len(a), "identical_continuations": same,
            "tokens_before_first_divergence": matched / max(1, sum(len(x["token_ids"]) for x in a)),
            "prompt_logprob_abs_diff_max": max(diffs), "prompt_logprob_abs_diff_mean": sum(diffs) / len(diffs)}


def reference(model: Path, ids: list[list[int]]) -> list[dict]:
    import torch

    from offline.evaluate import load_reference
    sys.path.insert(0, str(ROOT / "tests"))
    from vllm_helpers import reference_greedy
    ref = load_reference(str(model))
    with torch.no_grad():
        return [reference_greedy(ref, p, NEW_TOKENS) for p in ids]


def parallel(name: str, model: Path, ids: list[list[int]], work: Path) -> dict:
    """The checkpoint under tensor and expert parallel 2 against its single-GPU run (compiled, float32)."""
    import torch
    if torch.cuda.device_count() < 2:
        return {f"{name} {p}": f"skipped: needs 2 GPUs, {torch.cuda.device_count()} visible" for p in PARALLEL}
    specs = [str(model)] + [f"{model}@{args}" for args in PARALLEL.values()]
    got = served(specs, ids, work / f"{model.name}-parallel")
    return {f"{name} {p}": agreement(got[f"{model}@{args}"], got[str(model)]) for p, args in PARALLEL.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "gpu-check")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from vllm_submoe.vllm_compat import has_fp8_kernels
    t0 = time.time()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "compiled": {}, "fp8": {}, "parallel": {}}
    checkpoints = build(args.work)
    for name, ck in checkpoints.items():
        ids = prompts(ck["source"])
        if name in ("qwen2-moe 64->32", "mixtral 8->5/3/4/7"):
            result["parallel"].update(parallel(name, ck["remap"], ids, args.work))
        if name not in COMPILED:
            continue
        got = served([ck["remap"]], ids, args.work / f"{ck['remap'].name}-compiled")[str(ck["remap"])]
        result["compiled"][name] = {"checkpoint": ck["remap"].name, "flags": "float32, torch.compile + CUDA graphs",
                                    **agreement(got, reference(ck["remap"], ids))}
        if name.endswith("mone"):
            continue
        if not has_fp8_kernels():
            result["fp8"][name] = "skipped: this vLLM build has no FP8 kernels"
            continue
        for export in ("remap", "vanilla"):
            if export in ck:
                models = [ck[export]]
                plain = served(models, ids, args.work / f"{ck[export].name}-bf16", "--dtype", "bfloat16")
                fp8 = served(models, ids, args.work / f"{ck[export].name}-fp8", "--dtype", "bfloat16",
                             "--quantization", "fp8")
                result["fp8"][f"{name} {export}"] = agreement(fp8[str(ck[export])], plain[str(ck[export])])
    result["wall_seconds"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# GPU check, {result['date']}", "",
             f"{m['gpu'] or 'no GPU'}; vLLM {m['vllm']}, torch {m['torch']} (CUDA {m['cuda']}). _{harness.stamp(m)}_", "",
             "| run | identical continuations | tokens before divergence | prompt logprob |diff| max / mean |",
             "|---|---|---|---|"]
    for kind in ("compiled", "fp8", "parallel"):
        for name, r in result[kind].items():
            if isinstance(r, str):
                lines.append(f"| {kind}: {name} | {r} | | |")
            else:
                lines.append(f"| {kind}: {name} | {r['identical_continuations']}/{r['prompts']} | "
                             f"{r['tokens_before_first_divergence']:.2f} | "
                             f"{r['prompt_logprob_abs_diff_max']:.1e} / {r['prompt_logprob_abs_diff_mean']:.1e} |")
    lines += ["", "compiled: vLLM (float32, no --enforce-eager) against transformers' reference forward of the merged "
              "model. fp8: bf16 with --quantization fp8 against bf16 without. parallel: tensor parallel 2 (tp2) and "
              "expert parallel on 2 GPUs (ep2) against the same checkpoint on one GPU."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
