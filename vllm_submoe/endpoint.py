"""`GET /submoe/compression`: the served model's compression, as JSON, while it serves.

A `vllm.endpoint_plugins` entry point. vLLM loads route plugins only when they are named in
`VLLM_PLUGINS` (its opt-in for new HTTP surface): `VLLM_PLUGINS=submoe vllm serve ...` (the
general and stat-logger plugins share the name, so that one word keeps all three), or start
the server through `serving.launcher`, which opts in without dropping other plugins.

The answer is what `/metrics` exports as gauges plus what they cannot carry: the method, the
per-layer remap tables and the source, from the checkpoint's `submoe` block, and the
compression report when the checkpoint directory has one. A stock MoE answers
`"compressed": false` with its sizes, so two deployments compare field by field.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

ROUTE = "/submoe/compression"
logger = logging.getLogger("vllm_submoe.endpoint")


def describe(config: dict, model_dir: str, served_dtype_bytes: int | None = None) -> dict:
    """The JSON document the route serves; pure over the config and the checkpoint directory."""
    from submoe_format.checkpoint import BLOCK_KEY, parse_block, served_expert_maps

    from .metrics import compression_facts

    facts = compression_facts(config, model_dir, served_dtype_bytes)
    if facts is None:
        return {"compressed": False, "moe": False, "architecture": (config.get("architectures") or [None])[0]}
    doc = {"compressed": BLOCK_KEY in config, "moe": True, "architecture": config["architectures"][0],
           "model": model_dir, **facts, "expert_maps": served_expert_maps(config)}
    if BLOCK_KEY in config:
        block = parse_block(config)
        doc.update(method=block.method, source=dict(block.raw.get("source", {})), num_router_experts=block.num_router_experts)
        report = Path(model_dir) / "compression_report.json"
        if report.is_file():
            doc["report"] = json.loads(report.read_text())
    return doc


class CompressionEndpoint:
    name = "submoe"
    required_tasks = None  # a description of the weights; any task

    def attach_router(self, app) -> None:
        @app.get(ROUTE, tags=["submoe"])
        async def compression(request: Request) -> JSONResponse:
            """Method, experts per layer, remap tables, sizes and source of the served model."""
            doc = getattr(request.app.state, "submoe_compression", None)
            if doc is None:
                return JSONResponse({"error": "no engine behind this server"}, status_code=503)
            return JSONResponse(doc)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:  # vLLM's render-only server has no model
            return
        mc = engine_client.model_config
        # Computed once: the weights do not change while the server runs. A description that
        # cannot be built must not take the server down with it: the route reports the error.
        try:
            state.submoe_compression = describe(mc.hf_config.to_dict(), mc.model, mc.dtype.itemsize)
        except Exception as e:
            logger.warning("submoe: no compression description: %s", e)
            state.submoe_compression = {"error": f"{type(e).__name__}: {e}"}
