"""Token counting for admission (prompt + completion allowance) and for streams without usage.

Counts follow the OpenAI cookbook ("How to count tokens with tiktoken"), whose chat formula
matched the API exactly for gpt-3.5-turbo, gpt-4 and gpt-4o (129 and 124 tokens for its example
conversation; 105 and 101 with its example tool). Where the API's rendering is not public the
count is an approximation, chosen to land near the real figure rather than far above it,
because over-reserving wastes a deployment's TPM and under-reserving is corrected at settle time:

* images: 85 tokens for ``detail: low``, else 765 (85 + 170 per 512-px tile, assuming 2x2
  tiles, which is what a 1024x1024 image costs on gpt-4o-class models; the pixel size is not
  known without decoding the image, and other model families price images differently);
* audio and file parts: 0 (their size cannot be known cheaply; the upstream's usage settles it);
* tools: the cookbook's per-function formula (name:description, key:type:description per
  property, enum items), applied recursively to nested objects; schema keywords it does not
  model (anyOf, $ref, ...) are counted as their compact JSON;
* assistant ``tool_calls``: name + arguments + 3 per call;
* ``response_format`` json_schema: the compact JSON of the schema.

Text is always encoded with ``encode_ordinary``, so user text containing ``<|endoftext|>`` is
counted as plain text instead of raising. ``mode="fast"`` skips the tokenizer: characters / 4,
rounded up per string, plus the same structural overheads.

The encodings must be loaded before the first count on the event loop (``gateway.proxy.encodings.warm``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any

import tiktoken

from gateway.proxy import encodings
from gateway.snapshot.types import ESTIMATE_FAST, ESTIMATE_TIKTOKEN

# The values of DeploymentView.token_estimate.
MODE_TIKTOKEN = ESTIMATE_TIKTOKEN
MODE_FAST = ESTIMATE_FAST

ROUTE_CHAT = "chat"
ROUTE_COMPLETIONS = "completions"
ROUTE_EMBEDDINGS = "embeddings"

O200K = "o200k_base"
CL100K = "cl100k_base"

# Longest prefix first, so "gpt-4o" wins over "gpt-4". Lower-case, after stripping "ft:" and any
# "provider/" prefix.
_PREFIX_ENCODINGS: tuple[tuple[str, str], ...] = (
    ("chatgpt-4o", O200K),
    ("gpt-4o", O200K),
    ("gpt-4.1", O200K),
    ("gpt-4.5", O200K),
    ("gpt-5", O200K),
    ("gpt-oss", O200K),  # o200k_harmony: same BPE, extra specials only; encode_ordinary counts match
    ("o1", O200K),
    ("o3", O200K),
    ("o4", O200K),
    ("gpt-4", CL100K),
    ("gpt-3.5", CL100K),
    ("gpt-35", CL100K),
    ("text-embedding-", CL100K),
    ("davinci-002", CL100K),
    ("babbage-002", CL100K),
)

# Chat framing (cookbook, all current models): <|start|>{role}<|message|>...<|end|> and the
# reply primer <|start|>assistant<|message|>.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMER = 3
# Images (see module docstring).
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_DEFAULT = 85 + 170 * 4
TOOL_CALL_OVERHEAD = 3
# Cookbook tool formula; FUNC_INIT differs between the o200k (gpt-4o) and cl100k families.
FUNC_INIT = {O200K: 7, CL100K: 10}
PROP_INIT = 3
PROP_KEY = 3
ENUM_INIT = -3
ENUM_ITEM = 3
FUNC_END = 12
# Completions generate 16 tokens when max_tokens is omitted (OpenAI and vLLM default).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

_SHORT = 24  # strings this short (roles, names, enum items) are memoised per encoding
_SHORT_CACHE_MAX = 8192
# Longer texts are encoded in pieces: tiktoken encodes without the GIL but builds its result list
# with it, and a 5 MB prompt's list of ~1 M tokens held it for ~20 ms, a stall for the event loop.
_PIECE_CHARS = 65_536


def _encoding_name(model_name: str) -> str | None:
    name = model_name.strip().lower()
    if name in (O200K, CL100K):
        return name
    if name.startswith("ft:"):
        name = name[3:]
    name = name.rsplit("/", 1)[-1]
    for prefix, encoding in _PREFIX_ENCODINGS:
        if name.startswith(prefix):
            return encoding
    return None


@lru_cache(maxsize=1024)
def encoding_name_for(model_name: str, family_hint: str = "") -> str:
    """The encoding name for a model: the hint (e.g. ``DeploymentView.upstream_model``) wins when
    it is recognised, then the model name; unknown names get ``o200k_base``, the modern default."""
    return (family_hint and _encoding_name(family_hint)) or _encoding_name(model_name) or O200K


def encoding_for(model_name: str, family_hint: str = "") -> tiktoken.Encoding:
    """The loaded ``tiktoken.Encoding`` for a model (see ``encoding_name_for``). Cached."""
    return encodings.get_encoding(encoding_name_for(model_name, family_hint))


class _Tally:
    """Counts strings in one encoding (or by characters in fast mode) and knows its tool overhead."""

    __slots__ = ("count", "func_init")

    def __init__(self, encoding_name: str, mode: str) -> None:
        self.func_init = FUNC_INIT.get(encoding_name, FUNC_INIT[O200K])
        self.count: Callable[[str], int] = _fast_count if mode == MODE_FAST else _tiktoken_counter(encoding_name)


def _fast_count(text: str) -> int:
    return (len(text) + 3) // 4


@cache
def _tiktoken_counter(encoding_name: str) -> Callable[[str], int]:
    enc = encodings.get_encoding(encoding_name)
    encode = enc.encode_ordinary
    short: dict[str, int] = {}

    def count(text: str) -> int:
        if len(text) > _SHORT:
            return len(encode(text)) if len(text) <= _PIECE_CHARS else _count_in_pieces(text, encode)
        n = short.get(text)
        if n is None:
            if len(short) >= _SHORT_CACHE_MAX:
                short.clear()  # bounded; clients control these strings
            n = short[text] = len(encode(text))
        return n

    return count


def _count_in_pieces(text: str, encode: Callable[[str], list[int]]) -> int:
    """Tokens of a long text, encoded piece by piece. Each piece ends before a space, which starts
    a new pre-token in both encodings, so the sum equals the whole count (a run of several spaces
    cut in its middle can differ by one)."""
    total, start, end = 0, 0, len(text)
    while start < end:
        stop = start + _PIECE_CHARS
        if stop < end:
            cut = text.rfind(" ", start + 1, stop)
            stop = cut if cut > start else stop
        total += len(encode(text[start:stop]))
        start = stop
    return total


@lru_cache(maxsize=64)
def _tally(encoding_name: str, mode: str) -> _Tally:
    return _Tally(encoding_name, mode)


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def count_prompt_tokens(
    route: str, body: dict[str, Any], model: str, mode: str = MODE_TIKTOKEN, family_hint: str = ""
) -> int:
    """Estimate the prompt tokens of a request body before sending it.

    ``route`` is ``chat``, ``completions`` or ``embeddings``; ``body`` the parsed JSON; ``model``
    and ``family_hint`` choose the encoding; ``mode`` is ``tiktoken`` or ``fast``. Malformed
    parts of the body are skipped rather than raising: the upstream will reject them anyway.
    Raises ``ValueError`` for an unknown route or mode.
    """
    if mode not in (MODE_TIKTOKEN, MODE_FAST):
        raise ValueError(f"unknown token estimate mode {mode!r}")
    if route not in (ROUTE_CHAT, ROUTE_COMPLETIONS, ROUTE_EMBEDDINGS):
        raise ValueError(f"unknown route {route!r}")
    if not isinstance(body, dict):
        return 0
    tally = _tally(encoding_name_for(model, family_hint), mode)
    if route == ROUTE_CHAT:
        return _count_chat(body, tally)
    if route == ROUTE_COMPLETIONS:
        n = _count_prompt_forms(body.get("prompt"), tally)
        suffix = body.get("suffix")
        return n + (tally.count(suffix) if isinstance(suffix, str) else 0)
    return _count_prompt_forms(body.get("input"), tally)


def _count_prompt_forms(prompt: Any, tally: _Tally) -> int:
    """str | list[str] | list[int] | list[list[int]] (token arrays are counted exactly)."""
    if isinstance(prompt, str):
        return tally.count(prompt)
    if not isinstance(prompt, list):
        return 0
    total = 0
    for item in prompt:
        if isinstance(item, str):
            total += tally.count(item)
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list):
            total += len(item)
    return total


def _count_chat(body: dict[str, Any], tally: _Tally) -> int:
    messages = body.get("messages")
    total = REPLY_PRIMER
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                total += _count_message(message, tally)
    tools = body.get("tools")
    functions = body.get("functions")  # legacy spelling of tools
    if isinstance(tools, list) and tools:
        total += _count_tools(tools, tally)
    elif isinstance(functions, list) and functions:
        total += _count_tools([{"type": "function", "function": f} for f in functions], tally)
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema = response_format.get("json_schema")
        if isinstance(schema, dict):
            total += tally.count(_compact_json(schema.get("schema", schema)))
    return total


def _count_message(message: dict[str, Any], tally: _Tally) -> int:
    count = tally.count
    total = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if isinstance(value, str):
            total += count(value)
            if key == "name":
                total += TOKENS_PER_NAME
        elif key == "content" and isinstance(value, list):
            total += _count_parts(value, tally)
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                if isinstance(call, dict):
                    total += _count_function_call(call.get("function"), tally)
        elif key == "function_call":
            total += _count_function_call(value, tally)
    return total


def _count_parts(parts: list[Any], tally: _Tally) -> int:
    total = 0
    for part in parts:
        if isinstance(part, str):
            total += tally.count(part)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "image_url":
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, dict) else None
            total += IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS_DEFAULT
        else:
            # text, refusal; input_audio and file parts carry no countable text.
            text = part.get("text") if kind != "refusal" else part.get("refusal")
            if isinstance(text, str):
                total += tally.count(text)
    return total


def _count_function_call(function: Any, tally: _Tally) -> int:
    if not isinstance(function, dict):
        return 0
    total = TOOL_CALL_OVERHEAD
    for key in ("name", "arguments"):
        value = function.get(key)
        if isinstance(value, str):
            total += tally.count(value)
    return total


def _count_tools(tools: list[Any], tally: _Tally) -> int:
    total = 0
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            total += tally.count(_compact_json(tool))  # non-function tools: rough but bounded
            continue
        total += tally.func_init
        description = _strip_period(function.get("description"))
        total += tally.count(f"{function.get('name', '')}:{description}")
        parameters = function.get("parameters")
        if isinstance(parameters, dict):
            total += _count_properties(parameters.get("properties"), tally)
    return total + FUNC_END


def _count_properties(properties: Any, tally: _Tally) -> int:
    """The cookbook's property formula, recursing into nested objects and arrays of objects."""
    if not isinstance(properties, dict) or not properties:
        return 0
    total = PROP_INIT
    for key, prop in properties.items():
        total += PROP_KEY
        if not isinstance(prop, dict):
            continue
        enum = prop.get("enum")
        if isinstance(enum, list):
            total += ENUM_INIT
            for item in enum:
                total += ENUM_ITEM + tally.count(item if isinstance(item, str) else _compact_json(item))
        kind = prop.get("type", "")
        if isinstance(kind, list):
            kind = "|".join(str(k) for k in kind)
        total += tally.count(f"{key}:{kind}:{_strip_period(prop.get('description'))}")
        total += _count_properties(prop.get("properties"), tally)
        items = prop.get("items")
        if isinstance(items, dict):
            total += _count_properties(items.get("properties"), tally)
        for keyword in ("anyOf", "oneOf", "allOf", "$ref"):
            if keyword in prop:
                total += tally.count(_compact_json(prop[keyword]))
    return total


def _strip_period(description: Any) -> str:
    if not isinstance(description, str):
        return ""
    return description[:-1] if description.endswith(".") else description


def _positive_int(value: Any) -> int | None:
    # bool is an int subclass; a JSON true is not a token count.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def completion_allowance(route: str, body: dict[str, Any], default: int) -> int:
    """The completion tokens to reserve for a request.

    ``(max_completion_tokens or max_tokens or default) * max(n, 1)``; for completions, the
    number of generated candidates is ``max(n, best_of)`` (``best_of`` must be >= ``n`` and
    every candidate is billed), and a missing ``max_tokens`` means the upstream's default of 16.
    Embeddings generate nothing: 0.
    """
    if route == ROUTE_EMBEDDINGS:
        return 0
    limit = _positive_int(body.get("max_completion_tokens")) or _positive_int(body.get("max_tokens"))
    choices = _positive_int(body.get("n")) or 1
    if route == ROUTE_COMPLETIONS:
        if limit is None:
            limit = COMPLETIONS_DEFAULT_MAX_TOKENS
        choices = max(choices, _positive_int(body.get("best_of")) or 1)
    return (limit if limit is not None else max(default, 0)) * choices


class _TextBuffer:
    """Accumulates one stream of text and counts it in pieces, so memory and the final encode
    stay small. A piece is cut just before a space, which is a pre-token boundary for both
    encodings, so the sum equals encoding the whole text (up to runs of spaces)."""

    __slots__ = ("parts", "size", "tokens")
    FLUSH_CHARS = 8192

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.tokens = 0

    def add(self, text: str, count: Callable[[str], int]) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size >= self.FLUSH_CHARS:
            joined = "".join(self.parts)
            cut = joined.rfind(" ")
            if cut <= 0:
                cut = len(joined)
            self.tokens += count(joined[:cut])
            rest = joined[cut:]
            self.parts = [rest] if rest else []
            self.size = len(rest)

    def finish(self, count: Callable[[str], int]) -> int:
        if self.parts:
            self.tokens += count("".join(self.parts))
            self.parts = []
            self.size = 0
        return self.tokens


class StreamTokenCounter:
    """Counts the completion tokens of a chat or completions SSE stream, chunk by chunk.

    Feed every parsed ``data:`` JSON object (not ``[DONE]``) to ``feed``; call
    ``completion_tokens()`` at the end (or after a disconnect, for the tokens so far). Text is
    kept per choice and per channel (content, reasoning, each tool call) so pieces of different
    choices never run together. If the upstream sent a ``usage`` object it is kept in ``usage``:
    prefer it over the count.
    """

    __slots__ = ("_buffers", "_count", "_tool_calls", "usage")

    def __init__(self, model: str, family_hint: str = "", mode: str = MODE_TIKTOKEN) -> None:
        self._count = _tally(encoding_name_for(model, family_hint), mode).count
        self._buffers: dict[tuple[int, Any], _TextBuffer] = {}
        self._tool_calls = 0
        self.usage: dict[str, Any] | None = None

    def _add(self, key: tuple[int, Any], text: Any) -> None:
        if isinstance(text, str) and text:
            buffer = self._buffers.get(key)
            if buffer is None:
                buffer = self._buffers[key] = _TextBuffer()
            buffer.add(text, self._count)

    def feed(self, chunk: Any) -> None:
        """Take one parsed SSE event. Anything that is not a recognisable chunk is ignored."""
        if not isinstance(chunk, dict):
            return
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            index = index if isinstance(index, int) else 0
            self._add((index, "text"), choice.get("text"))  # completions
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._feed_delta(index, delta)

    def _feed_delta(self, index: int, delta: dict[str, Any]) -> None:
        self._add((index, "text"), delta.get("content"))
        self._add((index, "text"), delta.get("refusal"))
        # Reasoning text some OpenAI-compatible servers stream; it is billed as completion.
        self._add((index, "reasoning"), delta.get("reasoning_content") or delta.get("reasoning"))
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                if not isinstance(call, dict):
                    continue
                call_index = call.get("index", 0)
                function = call.get("function")
                if call.get("id"):
                    self._tool_calls += 1
                if isinstance(function, dict):
                    key = (index, ("tool", call_index))
                    self._add(key, function.get("name"))
                    self._add(key, function.get("arguments"))
        function_call = delta.get("function_call")
        if isinstance(function_call, dict):
            if function_call.get("name"):
                self._tool_calls += 1
            self._add((index, "function_call"), function_call.get("name"))
            self._add((index, "function_call"), function_call.get("arguments"))

    def completion_tokens(self) -> int:
        """Completion tokens counted so far (the tool-call overhead included)."""
        count = self._count
        return sum(b.finish(count) for b in self._buffers.values()) + TOOL_CALL_OVERHEAD * self._tool_calls
