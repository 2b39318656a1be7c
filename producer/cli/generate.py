"""``vlq generate``: answer one chat request with a local model folder, no queue involved."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from producer.cli.app import app, fail
from producer.errors import CheckpointError, InvalidRequest, VlqError


@app.command()
def generate(
    model: Annotated[Path, typer.Option("--model", help="model folder: config.json, weights, qwen.tiktoken")],
    request: Annotated[Path, typer.Option("--request", help="an OpenAI chat.completions request body (.json)")],
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=1, help="answer length limit (overrides the request)")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or cuda:N (default: engine.device)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="sampling seed (overrides the request)")] = None,
) -> None:
    """Answer one chat request and print its chat.completion JSON (content, usage, finish_reason, boxes).

    Images may be http(s) URLs, data: URIs, or file:// paths under the current folder or the request file's folder.
    This is how to check a model folder before starting workers.
    """
    try:
        body = read_request(request)
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
            body.pop("max_completion_tokens", None)
        if seed is not None:
            body["seed"] = seed
        result = generate_once(model, body, image_roots=[Path.cwd(), request.resolve().parent], device=device)
    except VlqError as e:
        fail(e)
    typer.echo(json.dumps(result, ensure_ascii=False, indent=2))


def read_request(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidRequest(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise InvalidRequest(f"{path} is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"{path} must hold one chat.completions request object")
    return body


def generate_once(model_dir: Path, body: dict[str, Any], *, image_roots: list[Path],
                  device: str | None = None) -> dict[str, Any]:
    """Load ``model_dir``, answer ``body`` and return the chat.completion dict.

    The engine is sized for this one request (batch 1, a KV cache of prompt + max_tokens), so a
    laptop does not allocate the worker's 32k-token cache.
    """
    from producer.config import Settings
    from producer.schema import parse_chat_request
    from worker.engine.chat import ChatEngine
    from worker.engine.tokenizer import QwenTokenizer
    from worker.images import ImageLoader

    request = parse_chat_request(body)
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist", path=str(model_dir))
    settings = Settings.load()
    limits = settings.engine.model_copy(update={"model_dir": model_dir, "max_batch_size": 1,
                                                **({"device": device} if device else {})})
    tokenizer = QwenTokenizer.from_model_dir(model_dir)
    probe = ChatEngine(limits, tokenizer, engine=None)  # limits only: refuses before loading weights
    prompt = probe.prompt(request)
    answer_len = probe.sampling_params(request).max_tokens
    seq_len = min(limits.max_seq_len, len(prompt) + answer_len)
    limits = limits.model_copy(update={"max_seq_len": seq_len,
                                       "max_input_len": min(limits.max_input_len, seq_len - 1)})

    roots = list(dict.fromkeys([*settings.images.allowed_roots, *image_roots]))
    with ImageLoader(settings.images.model_copy(update={"allowed_roots": roots}), settings.store.s3) as loader:
        images = loader.load_all(request.image_urls)
    chat = ChatEngine.from_settings(limits, tokenizer=tokenizer, model_name=settings.api.served_model)
    try:
        request_id = f"generate-{uuid.uuid4().hex[:16]}"
        return chat.submit(request, images, request_id=request_id).result()
    finally:
        chat.close()

