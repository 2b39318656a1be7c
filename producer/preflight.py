"""Checks a chat request before it is queued, so bad input costs no GPU time and fails at once.

What :class:`Preflight` checks, in order:

1. the body is a chat.completions request vlq serves (:func:`producer.schema.parse_chat_request`:
   roles, content part types, sampling ranges, ``n == 1``, no tools) -> ``invalid_request`` /
   ``unsupported_content``;
2. the number of images against ``engine.max_images`` -> ``too_many_images``;
3. where the model's tokenizer can be loaded here (``engine.model_dir`` set and readable, the
   worker extra's ``tiktoken`` installed), the prompt is built exactly as the worker builds it and
   its length is checked against ``engine.max_input_len`` -> ``prompt_too_long``; images in
   system or assistant messages and an empty last message are refused as the worker would.

Images themselves are not fetched: a URL that cannot be read fails the job on the worker with
its ``image_*`` code. The worker repeats every check (it trusts nothing).
"""

from __future__ import annotations

import logging
from typing import Any

from producer.config import Settings
from producer.errors import TooManyImages, VlqError
from producer.schema import ChatRequest, parse_chat_request

log = logging.getLogger(__name__)


class Preflight:
    """A request checker built once from the settings (loads the tokenizer if it can)."""

    def __init__(
        self, settings: Settings, *, tokenizer: Any | None = None, load_tokenizer: bool = True
    ) -> None:
        self.settings = settings
        engine = settings.engine
        self.max_images = engine.max_images
        # The worker clips its input limit so that one answer token always fits.
        self.max_input_len = min(engine.max_input_len, engine.max_seq_len - 1)
        self.tokenizer = tokenizer
        if self.tokenizer is None and load_tokenizer:
            self.tokenizer = _load_tokenizer(settings)

    @property
    def checks_prompt_length(self) -> bool:
        return self.tokenizer is not None

    def check(self, body: Any) -> ChatRequest:
        """The typed request, or the coded :class:`producer.errors.BadInput` for it."""
        request = parse_chat_request(body)
        n_images = len(request.image_urls)
        if n_images > self.max_images:
            raise TooManyImages(
                f"the request has {n_images} images; a worker accepts at most {self.max_images}"
                " (engine.max_images): split it into several requests",
                param="messages",
            )
        if self.tokenizer is not None:
            self.prompt_tokens(request)
        return request

    def prompt_tokens(self, request: ChatRequest) -> int | None:
        """The prompt's length in tokens (None without a tokenizer). Raises ``prompt_too_long``."""
        if self.tokenizer is None:
            return None
        from worker.engine.prompt import build_prompt

        prompt = build_prompt(
            request, self.tokenizer, max_images=self.max_images, max_input_len=self.max_input_len
        )
        return len(prompt.ids)


def _load_tokenizer(settings: Settings) -> Any | None:
    model_dir = settings.engine.model_dir
    if model_dir is None:
        return None
    try:
        from worker.engine.tokenizer import QwenTokenizer

        tokenizer = QwenTokenizer.from_model_dir(model_dir)
    except ImportError as e:
        log.info("prompt lengths are checked by workers only: the tokenizer needs %s", e.name)
        return None
    except VlqError as e:
        log.warning("prompt lengths are checked by workers only: %s", e.message)
        return None
    log.info("pre-flight checks prompt lengths with %s", tokenizer.source)
    return tokenizer
