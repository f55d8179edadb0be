"""The request fields the gateway itself relies on, checked strictly; every other field passes untouched.

The gateway reads ``max_tokens``/``max_completion_tokens``, ``n`` and ``best_of`` (the
completion allowance it reserves), ``stream`` and ``stream_options`` (how it relays),
``priority`` (its queue) and the prompt (``messages``, ``prompt`` or ``input``, which it counts).
A value it cannot use is a 400 naming the field in ``param``, with OpenAI's codes
(``invalid_type``, ``integer_below_min_value``, ``integer_above_max_value``, ``empty_array``,
``missing_required_parameter``), instead of being forwarded for the upstream to judge after
capacity was reserved for it. ``null`` means "not given", as in OpenAI's API.
"""

from __future__ import annotations

from typing import Any

from gateway.proxy import errors
from gateway.proxy.routes import CHAT, COMPLETIONS, EMBEDDINGS

MAX_PRIORITY = 255
MAX_CHOICES = 128  # OpenAI's limit for n; the allowance reserved is max_tokens x n

PROMPT_FIELD = {CHAT: "messages", COMPLETIONS: "prompt", EMBEDDINGS: "input"}


def check_fields(operation: str, payload: dict[str, Any]) -> None:
    """Raise a 400 ``GatewayError`` for the first field the gateway relies on that it cannot use.

    ``operation`` is CHAT, COMPLETIONS or EMBEDDINGS; ``payload`` the parsed body (not changed).
    """
    _integer(payload, "priority", minimum=0, maximum=MAX_PRIORITY)
    if operation != EMBEDDINGS:
        _integer(payload, "max_tokens", minimum=1)
        _integer(payload, "max_completion_tokens", minimum=1)
        _integer(payload, "n", minimum=1, maximum=MAX_CHOICES)
        if operation == COMPLETIONS:
            _integer(payload, "best_of", minimum=1, maximum=MAX_CHOICES)
        _boolean(payload, "stream")
        options = payload.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise _wrong_type("stream_options", "an object", options)
            _boolean(options, "include_usage", param="stream_options.include_usage")
    field = PROMPT_FIELD[operation]
    if payload.get(field) is None:
        raise errors.bad_request(
            f"Missing required parameter: '{field}'.", param=field, code="missing_required_parameter"
        )
    if operation == CHAT:
        _messages(payload["messages"])
    else:
        _prompt(field, payload[field], allow_empty_string=operation == COMPLETIONS)


def _integer(payload: dict[str, Any], name: str, *, minimum: int, maximum: int | None = None) -> None:
    value = payload.get(name)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):  # JSON true is not a count
        raise _wrong_type(name, "an integer", value)
    if value < minimum:
        raise errors.bad_request(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {minimum}, but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if maximum is not None and value > maximum:
        raise errors.bad_request(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {maximum}, but got {value} instead.",
            param=name,
            code="integer_above_max_value",
        )


def _boolean(payload: dict[str, Any], name: str, *, param: str | None = None) -> None:
    value = payload.get(name)
    if value is not None and not isinstance(value, bool):
        raise _wrong_type(param or name, "a boolean", value)


def _messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise _empty("messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _wrong_type(f"messages[{i}]", "an object", message)


def _prompt(field: str, value: Any, *, allow_empty_string: bool) -> None:
    """A string, or a non-empty list of strings, of token ids, or of non-empty lists of token ids."""
    if isinstance(value, str):
        if not value and not allow_empty_string:
            raise errors.bad_request(
                f"Invalid '{field}': empty string. Expected a non-empty string.", param=field, code="empty_string"
            )
        return
    if not isinstance(value, list):
        raise _wrong_type(field, "a string or an array", value)
    if not value:
        raise _empty(field)
    kinds = set(map(type, value))  # in C: token arrays are long
    if kinds == {str}:
        if not allow_empty_string and not all(value):
            raise errors.bad_request(f"Invalid '{field}': empty string in the array.", param=field, code="empty_string")
        return
    if kinds == {int}:
        if min(value) < 0:
            raise errors.bad_request(
                f"Invalid '{field}': token ids must not be negative.", param=field, code="integer_below_min_value"
            )
        return
    if kinds == {list}:
        for i, tokens in enumerate(value):
            if not tokens:
                raise _empty(f"{field}[{i}]")
            if set(map(type, tokens)) != {int} or min(tokens) < 0:
                raise _wrong_type(f"{field}[{i}]", "an array of token ids (non-negative integers)", tokens)
        return
    raise _wrong_type(
        field, "a string, an array of strings, an array of token ids or an array of token id arrays", value
    )


_JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array"}


def _wrong_type(param: str, expected: str, value: Any) -> errors.GatewayError:
    got = "an object" if isinstance(value, dict) else _JSON_TYPES.get(type(value), "null")
    return errors.bad_request(
        f"Invalid type for '{param}': expected {expected}, but got {got} instead.", param=param, code="invalid_type"
    )


def _empty(param: str) -> errors.GatewayError:
    return errors.bad_request(
        f"Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead.",
        param=param,
        code="empty_array",
    )
