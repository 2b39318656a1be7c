"""What a chat request may hold: OpenAI's body as clients really send it, and refusals that name
the field at fault."""

from __future__ import annotations

import pytest

from producer.errors import InvalidRequest
from producer.schema import parse_chat_request

BODY = {"model": "QwenVL", "messages": [{"role": "user", "content": "hi"}]}


def test_null_stream_and_n_mean_their_defaults_as_in_openai_schema() -> None:
    request = parse_chat_request({**BODY, "stream": None, "n": None, "stream_options": None, "tool_choice": None})
    assert (request.stream, request.n) == (False, 1)


@pytest.mark.parametrize("extra", [{"tool_choice": "none"}, {"modalities": ["text"]},
                                   {"stream": True, "stream_options": {"include_usage": True}}])
def test_settings_that_ask_for_what_vlq_does_anyway_are_accepted(extra: dict) -> None:
    parse_chat_request({**BODY, **extra})


@pytest.mark.parametrize("extra, param, says", [
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "needs tools"),
    ({"function_call": "auto"}, "function_call", "needs tools"),
    ({"modalities": ["audio"]}, "modalities", "text only"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options", "stream: true"),
])
def test_what_would_change_the_answer_and_is_not_served_is_refused(extra: dict, param: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request({**BODY, **extra})
    assert caught.value.context["param"] == param and says in caught.value.message


def test_an_earlier_tool_call_is_refused_as_such_not_as_a_null_content() -> None:
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
                {"role": "user", "content": "and?"}]
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request({"messages": messages})
    assert caught.value.context["param"] == "messages[1].function_call"
    assert "function calling" in caught.value.message
