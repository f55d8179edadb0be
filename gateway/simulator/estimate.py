"""Token arithmetic of the simulated upstream: prompt estimate, completion allowance, output size.

Contract:

* ``prompt_tokens(kind, body, encoding)`` is the count Azure would make on arrival:
  chat follows the OpenAI cookbook (3 per message + encoded string values + 1 per ``name``
  + 3 reply priming); completions/embeddings encode ``prompt``/``input`` (strings, lists of
  strings, token lists count their length). With a tiktoken ``encoding`` it uses
  ``encode_ordinary`` so ``<|endoftext|>`` in user text is plain text; with None ("fast"
  mode) each string counts ``len(text) // 4 + 1``, same structure, for benchmark runs where
  the simulator must stay cheap.
* ``allowance(kind, body, default_max_tokens)``: the completion tokens counted on arrival,
  ``(max_completion_tokens or max_tokens or default) * max(n, best_of)``; 0 for embeddings.
* ``generated_tokens(body, configured)``: tokens each choice produces, capped by the request's
  limit, and whether the cap was hit (finish_reason "length").

Encodings are loaded by :class:`EncodingCache` in a worker thread; the request path asks
``get`` (non-blocking) and only awaits ``load`` the first time a model's encoding is needed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from .config import ESTIMATE_FAST
from .encodings import get_encoding

CHAT = "chat"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"

_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
_IMAGE_TOKENS = 85  # gpt-4o low-detail image; the simulator does not fetch images.


class EncodingCache:
    """Loads tiktoken encodings off the event loop and hands them out without blocking.

    Used from one event loop only (the simulator's); concurrent first requests share one load.
    """

    def __init__(self) -> None:
        self._ready: dict[str, Any] = {}
        self._pending: dict[str, asyncio.Future] = {}

    def get(self, name: str) -> Any | None:
        """The loaded encoding, or None if it still has to be loaded."""
        return self._ready.get(name)

    async def load(self, name: str) -> Any:
        """Load ``name`` in the default executor (once) and return it."""
        enc = self._ready.get(name)
        if enc is not None:
            return enc
        fut = self._pending.get(name)
        if fut is None:
            fut = asyncio.get_running_loop().run_in_executor(None, get_encoding, name)
            self._pending[name] = fut
        try:
            enc = await asyncio.shield(fut)
        finally:
            if fut.done():
                self._pending.pop(name, None)  # a failed load may be retried later
        self._ready[name] = enc
        return enc


def _fast_count(text: str) -> int:
    return len(text) // 4 + 1


def _counter(encoding: Any | None) -> Callable[[str], int]:
    if encoding is None:
        return _fast_count
    encode = encoding.encode_ordinary
    return lambda text: len(encode(text))


def _content_tokens(content: Any, count: Callable[[str], int]) -> int:
    if isinstance(content, str):
        return count(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                total += count(part["text"])
            elif kind in ("image_url", "input_image"):
                total += _IMAGE_TOKENS
        return total
    if content is None:
        return 0
    # tool_calls, function_call, audio...: count their JSON text, a fair approximation.
    return count(json.dumps(content, separators=(",", ":")))


def _chat_tokens(body: dict, count: Callable[[str], int]) -> int:
    total = _REPLY_PRIMING
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        total += _TOKENS_PER_MESSAGE
        for key, value in message.items():
            total += _content_tokens(value, count)
            if key == "name":
                total += _TOKENS_PER_NAME
    tools = body.get("tools") or body.get("functions")
    if tools:
        total += count(json.dumps(tools, separators=(",", ":")))
    return total


def _input_tokens(value: Any, count: Callable[[str], int]) -> int:
    """A prompt/input: str, [str], [int] (one token list) or [[int]]."""
    if isinstance(value, str):
        return count(value)
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return len(value)
        return sum(_input_tokens(v, count) for v in value)
    return 0


def prompt_tokens(kind: str, body: dict, encoding: Any | None) -> int:
    """Arrival estimate of the prompt. ``encoding`` None = fast mode."""
    count = _counter(encoding)
    if kind == CHAT:
        return _chat_tokens(body, count)
    if kind == COMPLETIONS:
        return _input_tokens(body.get("prompt", ""), count)
    return _input_tokens(body.get("input", ""), count)


def needs_encoding(mode: str) -> bool:
    return mode != ESTIMATE_FAST


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def requested_max(body: dict) -> int | None:
    """The request's completion cap: max_completion_tokens, else max_tokens."""
    return _positive_int(body.get("max_completion_tokens")) or _positive_int(body.get("max_tokens"))


def choices(body: dict) -> int:
    """How many choices the response carries (``n``, at least 1)."""
    return _positive_int(body.get("n")) or 1


def allowance(kind: str, body: dict, default_max_tokens: int) -> int:
    """Completion tokens counted on arrival (never corrected on standard deployments)."""
    if kind == EMBEDDINGS:
        return 0
    per_choice = requested_max(body) or default_max_tokens
    multiplier = choices(body)
    if kind == COMPLETIONS:
        multiplier = max(multiplier, _positive_int(body.get("best_of")) or 1)
    return per_choice * multiplier


def generated_tokens(body: dict, configured: int) -> tuple[int, bool]:
    """(tokens per choice, capped?) given the deployment's ``completion_tokens``."""
    cap = requested_max(body)
    if cap is not None and cap < configured:
        return cap, True
    return configured, False
