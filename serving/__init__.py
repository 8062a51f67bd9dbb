"""Serving side: launch `vllm serve`, talk to it over HTTP, compare deployments."""
