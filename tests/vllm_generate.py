"""Run one vLLM engine (offline LLM API) on token-id prompts; print greedy tokens and logprobs as JSON.

A subprocess per engine keeps vLLM's worker processes and global state out of pytest.
    python tests/vllm_generate.py MODEL PROMPTS.json OUT.json [--max-tokens N]
"""
import argparse
import json
import os

for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}.items():
    os.environ.setdefault(k, v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prompts")
    ap.add_argument("out")
    ap.add_argument("--max-tokens", type=int, default=12)
    args = ap.parse_args()
    from vllm import LLM, SamplingParams

    prompts = json.load(open(args.prompts))
    llm = LLM(model=args.model, dtype="float32", max_model_len=512, seed=0)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=1, prompt_logprobs=1, ignore_eos=True)
    results = []
    for out in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False):
        o = out.outputs[0]
        results.append({
            "token_ids": list(o.token_ids),
            "logprobs": [step[t].logprob for step, t in zip(o.logprobs, o.token_ids)],
            "prompt_logprobs": [None if step is None else step[t].logprob
                                for step, t in zip(out.prompt_logprobs, out.prompt_token_ids)],
        })
    json.dump(results, open(args.out, "w"))


if __name__ == "__main__":
    main()
