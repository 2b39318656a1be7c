"""``GET /v1/models``: the one model this deployment serves (``api.served_model``).

Requests may name any model (the seed's clients send ``"QwenVL"`` or ``""``): every worker
serves the same Qwen-VL-Chat, and the answer echoes the name the request gave."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from producer.api.context import get_ctx
from producer.errors import JobNotFound

router = APIRouter(tags=["models"])


def _model(ctx: Any) -> dict[str, Any]:
    return {"id": ctx.settings.api.served_model, "object": "model", "created": int(ctx.started_at),
            "owned_by": "vlq"}


@router.get("/v1/models", summary="The served model")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model(get_ctx(request))]}


@router.get("/v1/models/{model_id}", summary="The served model, by name")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    ctx = get_ctx(request)
    if model_id != ctx.settings.api.served_model:
        raise JobNotFound(f"no model {model_id!r}; this server serves {ctx.settings.api.served_model!r}",
                          code="model_not_found", param="model")
    return _model(ctx)
