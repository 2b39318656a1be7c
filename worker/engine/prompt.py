"""ChatML prompt ids for Qwen-VL-Chat from an OpenAI chat request.

The format (the seed's server, and Qwen-VL's fine-tuning data)::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n          one per message, user and assistant turns
    <|im_start|>assistant\\n                           the generation prompt

``system`` is the request's leading system message, else ``You are a helpful assistant.``. A
message's ``content`` is its parts in order: a text part as written, an image part as
``Picture {n}: <img>`` + 256 ``<imgpad>`` slots + ``</img>\\n`` with ``n`` counting the
conversation's images from 1. The content is then stripped of leading newlines and trailing
whitespace (the seed's server does this; it drops the ``\\n`` after an image that ends a message).

Special tokens enter the ids only here, by id; text (the user's, the assistant's, the system
prompt, even ``Picture 1: ``) goes through :meth:`QwenTokenizer.encode`, which never produces a
special id. Text between two special tokens is encoded as one run, as a tokenizer that splits a
prompt string on its special tokens would. This module needs no torch: the HTTP API uses it to
check a request before it is queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from producer.errors import InvalidRequest, PromptTooLong, TooManyImages, UnsupportedContent
from producer.schema import ChatRequest, ImagePart, TextPart
from worker.engine.tokenizer import QwenTokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_SLOTS = 256  # vision features per image (the resampler's 16x16 queries)
_ASCII_WHITESPACE = " \t\n\r\v\f"  # what the seed's server strips (C isspace)


@dataclass(frozen=True)
class Prompt:
    """Prompt ids and where each image's 256 features go.

    ``image_slots[k]`` is the index in ``ids`` of the first of image ``k``'s 256 ``<imgpad>``
    slots; ``image_urls[k]`` its URL (picture ``k + 1`` of the conversation).
    """

    ids: list[int]
    image_slots: list[int]
    image_urls: list[str]

    def __len__(self) -> int:
        return len(self.ids)


class _Special(int):
    """A special token id placed by the builder (never the result of encoding text)."""


_Item = Union[str, _Special]


def build_prompt(
    request: ChatRequest,
    tokenizer: QwenTokenizer,
    *,
    max_images: int = 26,
    max_input_len: int = 30720,
) -> Prompt:
    """Build the prompt of ``request``.

    Raises :class:`TooManyImages` above ``max_images`` images, :class:`PromptTooLong` above
    ``max_input_len`` ids, :class:`UnsupportedContent` for an image in a system or assistant
    message, :class:`InvalidRequest` when the last user message is empty.
    """
    urls = _check_images(request, max_images)
    items = _chatml_items(request, tokenizer)

    ids: list[int] = []
    image_slots: list[int] = []
    run: list[str] = []
    for item in items:
        if isinstance(item, _Special):
            if run:
                ids.extend(tokenizer.encode("".join(run)))
                run.clear()
            if item == tokenizer.imgpad_id and ids[-1] == tokenizer.img_start_id:
                image_slots.append(len(ids))
            ids.append(int(item))
        else:
            run.append(item)
    if run:
        ids.extend(tokenizer.encode("".join(run)))

    if len(ids) > max_input_len:
        raise PromptTooLong(
            f"the prompt is {len(ids)} tokens but this engine accepts at most {max_input_len} "
            f"(each image costs {IMAGE_SLOTS + 8} tokens); shorten the text, send fewer images "
            "or drop earlier turns of the conversation",
            prompt_tokens=len(ids),
            max_input_len=max_input_len,
        )
    return Prompt(ids=ids, image_slots=image_slots, image_urls=urls)


def _check_images(request: ChatRequest, max_images: int) -> list[str]:
    for i, msg in enumerate(request.messages):
        if msg.role != "user" and msg.image_urls:
            raise UnsupportedContent(
                f"messages[{i}] ({msg.role}) has an image; Qwen-VL-Chat takes images only in "
                "user messages: move the image_url part into a user message",
                param=f"messages[{i}].content",
            )
    urls = request.image_urls
    if len(urls) > max_images:
        raise TooManyImages(
            f"the conversation has {len(urls)} images but this engine accepts at most "
            f"{max_images} per request; split it into several requests",
            images=len(urls),
            max_images=max_images,
        )
    return urls


def _chatml_items(request: ChatRequest, tok: QwenTokenizer) -> list[_Item]:
    im_start, im_end = _Special(tok.im_start_id), _Special(tok.im_end_id)
    messages = list(request.messages)
    system = DEFAULT_SYSTEM_PROMPT
    if messages[0].role == "system":
        system = messages.pop(0).text  # text only: the schema refuses images here
    items: list[_Item] = [im_start, "system\n", system, im_end, "\n"]

    n_images = 0
    for msg in messages:
        content: list[_Item] = []
        for part in msg.parts:
            if isinstance(part, TextPart):
                content.append(part.text)
            elif isinstance(part, ImagePart):
                n_images += 1
                content += [f"Picture {n_images}: ", _Special(tok.img_start_id)]
                content += [_Special(tok.imgpad_id)] * IMAGE_SLOTS
                content += [_Special(tok.img_end_id), "\n"]
            else:  # the schema admits only these two; a new part type must be handled here
                raise UnsupportedContent(f"content part of type {type(part).__name__} is not supported")
        content = _strip(content)
        if msg is messages[-1] and not content:
            raise InvalidRequest(
                "the last user message is empty: give it text or an image",
                param=f"messages[{len(request.messages) - 1}].content",
            )
        items += [im_start, f"{msg.role}\n", *content, im_end, "\n"]

    items += [im_start, "assistant\n"]
    return items


def _strip(content: list[_Item]) -> list[_Item]:
    """Strip leading newlines and trailing whitespace from the text at the ends of ``content``."""
    out = [c for c in content if c != ""]
    while out and isinstance(out[0], str):
        out[0] = out[0].lstrip("\n")
        if out[0]:
            break
        out.pop(0)
    while out and isinstance(out[-1], str):
        out[-1] = out[-1].rstrip(_ASCII_WHITESPACE)
        if out[-1]:
            break
        out.pop()
    return out
