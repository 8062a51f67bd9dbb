"""`submoe loadtest`: the same seeded workload against two deployments, side by side.

workload.py  prompts from held-out data, Poisson arrival times (pure, seeded)
records.py   one request's timings (RequestRecord) and their summary statistics (pure)
runner.py    closed-loop and open-loop drivers over the `openai` async client
probes.py    what the server itself says: memory of its processes, /metrics, prompt logprobs
report.py    JSON, markdown and plots; the summary table
cli.py       deployments (a model directory is served with `vllm serve`, a URL is used as is)
"""
