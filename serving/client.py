"""The `openai` client pointed at a vLLM server, and the model it serves."""
from __future__ import annotations

import openai


def client_for(base_url: str, api_key: str = "EMPTY") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=300)


def served_model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id
