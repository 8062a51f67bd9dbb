"""Run vLLM engines (offline LLM API) on token-id prompts; write greedy tokens and logprobs as JSON.

A subprocess keeps vLLM's worker processes and global state out of pytest. With several models,
their engines run one after another in this one process (vLLM is imported once), and OUT holds
{model: results}. A model may carry engine arguments of its own after an `@`, e.g.
`DIR@tensor_parallel_size=2,enforce_eager=0` (its key in OUT is the whole string); CPU workers get
the thread binding vLLM's CPU build needs, as `vllm serve` through serving.launcher does.
    python tests/vllm_generate.py MODEL [MODEL ...] --prompts PROMPTS.json --out OUT.json [--max-tokens N]
        [--enforce-eager] [--dtype float32] [--quantization fp8]
"""
import argparse
import gc
import json
import os
import sys
import time

for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}.items():
    os.environ.setdefault(k, v)


def engine_args(spec: str) -> tuple[str, dict]:
    """`DIR@key=value,...` -> (DIR, {key: value}), integers as int, true/false as bool; a bare DIR has no
    arguments of its own."""
    model, _, rest = spec.partition("@")
    pairs = (item.split("=") for item in rest.split(",") if item)
    parse = {"true": True, "false": False}
    return model, {k: int(v) if v.isdigit() else parse.get(v, v) for k, v in pairs}


def generate(spec: str, prompts: list[list[int]], max_tokens: int, enforce_eager: bool, dtype: str = "float32",
             quantization: str | None = None) -> list[dict]:
    import torch
    from vllm import LLM, SamplingParams
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from serving.launcher import cpu_thread_binding

    model, own = engine_args(spec)
    enforce_eager = bool(own.pop("enforce_eager", enforce_eager))
    cpu = not torch.cuda.is_available()
    if cpu:
        world = own.get("tensor_parallel_size", 1) * own.get("pipeline_parallel_size", 1)
        binding = cpu_thread_binding(world)
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        if binding:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding

    # float32 (the default) for exact comparisons. On a CPU with AMX, vLLM picks its AMX MLA kernel for DeepSeek's
    # latent attention, which takes bf16 weights only: the reference CPU MLA kernel takes float32.
    mla = "kv_lora_rank" in json.load(open(os.path.join(model, "config.json")))
    llm = LLM(model=model, dtype=dtype, max_model_len=512, seed=0, enforce_eager=enforce_eager, quantization=quantization,
              **({"attention_backend": "CPU_MLA"} if mla and cpu else {}), **own)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=1, prompt_logprobs=1, ignore_eos=True)
    results = []
    for out in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False):
        o = out.outputs[0]
        results.append({
            "token_ids": list(o.token_ids),
            "logprobs": [step[t].logprob for step, t in zip(o.logprobs, o.token_ids)],
            "prompt_logprobs": [None if step is None else step[t].logprob
                                for step, t in zip(out.prompt_logprobs, out.prompt_token_ids)],
        })
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start-up)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default=None, help="vLLM's --quantization (fp8: online dynamic FP8)")
    args = ap.parse_args()
    prompts = json.load(open(args.prompts))
    results = {}
    for m in args.models:
        t0 = time.time()
        results[m] = generate(m, prompts, args.max_tokens, args.enforce_eager, args.dtype, args.quantization)
        print(f"vllm_generate: {m}: {time.time() - t0:.1f} s", file=sys.stderr)
    json.dump(results if len(args.models) > 1 else results[args.models[0]], open(args.out, "w"))


if __name__ == "__main__":
    main()
