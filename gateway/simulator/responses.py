"""Wire shapes of the simulated upstream: JSON bodies, SSE events, error bodies.

Pure functions returning ``bytes`` (or dicts for tests), no I/O. Shapes follow
``/work/shared/reference/openai-wire.md`` sections 4-6:

* chat: ``chat.completion`` / ``chat.completion.chunk``; completions: ``text_completion``
  (streamed and not); embeddings: ``list`` of ``embedding`` items, float lists or base64 of
  little-endian float32.
* generated text is ``"tok0 tok1 ..."``, one piece per token, so tests can check counts.
* errors: OpenAI-shaped ``{"error": {"message", "type", "param", "code"}}``; Azure throttling
  and routing errors use Azure's ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import base64
import json
import math
import sys
import zlib
from array import array
from functools import lru_cache
from typing import Any

from gateway.proxy.tokens import ROUTE_CHAT as CHAT
from gateway.proxy.tokens import ROUTE_COMPLETIONS as COMPLETIONS

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

SSE_DONE = b"data: [DONE]\n\n"

_SAFE = {"filtered": False, "severity": "safe"}
CONTENT_FILTER_RESULTS = {
    "hate": _SAFE,
    "self_harm": _SAFE,
    "sexual": _SAFE,
    "violence": _SAFE,
}
PROMPT_FILTER_RESULTS = [{"prompt_index": 0, "content_filter_results": CONTENT_FILTER_RESULTS}]

_OPERATIONS = {
    CHAT: "ChatCompletions_Create",
    COMPLETIONS: "Completions_Create",
    "embeddings": "Embeddings_Create",
}


def dumps(data: Any) -> bytes:
    return _dumps(data).encode("utf-8")


def token_piece(i: int) -> str:
    return f"tok{i} "


def generated_text(tokens: int) -> str:
    return "".join(token_piece(i) for i in range(tokens))


# ---------------------------------------------------------------- errors


def openai_error(
    message: str, type_: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> bytes:
    return dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def azure_error(code: str, message: str) -> bytes:
    return dumps({"error": {"code": code, "message": message}})


def status_error(
    status: int,
    message: str | None = None,
    type_: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    """Body for an injected status fault: OpenAI-shaped, type derived from the class unless given."""
    if status >= 500:
        default_type, default_message = "server_error", "The server had an error while processing your request."
    else:
        default_type, default_message = "invalid_request_error", f"Simulated error {status}."
    return openai_error(
        default_message if message is None else message,
        default_type if type_ is None else type_,
        code=str(status) if code is None else code,
        param=param,
    )


def rate_limit_body(kind: str, api_version: str, reason: str, retry_after_s: int) -> bytes:
    operation = _OPERATIONS.get(kind, "ChatCompletions_Create")
    if reason == "utilization":
        what = "exceeded the provisioned throughput of this deployment (utilization >= 100%)"
    elif reason == "requests":
        what = "exceeded call rate limit of your current AIServices S0 pricing tier"
    elif reason == "injected":
        what = "exceeded the rate limit (simulated)"
    else:
        what = "exceeded token rate limit of your current AIServices S0 pricing tier"
    return azure_error(
        "429",
        f"Requests to the {operation} Operation under Azure OpenAI API version {api_version} "
        f"have {what}. Please retry after {retry_after_s} seconds.",
    )


# ---------------------------------------------------------------- usage


# ---------------------------------------------------------------- non-streaming bodies


@lru_cache(maxsize=512)
def _choices_json(kind: str, n: int, tokens: int, finish_reason: str, annotations: bool) -> str:
    # The choices only depend on these; caching them keeps the benchmark hot path cheap.
    text = generated_text(tokens)
    choices: list[dict[str, Any]] = []
    for index in range(n):
        if kind == CHAT:
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
        if annotations:
            choice["content_filter_results"] = CONTENT_FILTER_RESULTS
        choices.append(choice)
    return _dumps(choices)


def _usage_json(prompt: int, completion: int) -> str:
    return (
        f'{{"prompt_tokens":{prompt},"completion_tokens":{completion},'
        f'"total_tokens":{prompt + completion},"prompt_tokens_details":{{"cached_tokens":0}},'
        f'"completion_tokens_details":{{"reasoning_tokens":0}}}}'
    )


_PROMPT_FILTER_JSON = _dumps(PROMPT_FILTER_RESULTS)


def completion_body(
    kind: str,
    response_id: str,
    created: int,
    model: str,
    n: int,
    tokens: int,
    finish_reason: str,
    prompt_tokens: int,
    annotations: bool,
) -> bytes:
    """A whole chat.completion or text_completion with ``n`` identical choices."""
    obj = "chat.completion" if kind == CHAT else "text_completion"
    extra = f',"prompt_filter_results":{_PROMPT_FILTER_JSON}' if annotations else ""
    return (
        f'{{"id":{_dumps(response_id)},"object":"{obj}","created":{created},'
        f'"model":{_dumps(model)},"system_fingerprint":"fp_simulated",'
        f'"choices":{_choices_json(kind, n, tokens, finish_reason, annotations)},'
        f'"usage":{_usage_json(prompt_tokens, tokens * n)}{extra}}}'
    ).encode()


def _embedding_vector(item: Any, dims: int) -> array:
    """Deterministic unit vector for an input item (same input -> same embedding)."""
    seed = zlib.crc32(dumps(item)) or 1
    values = []
    for _ in range(dims):
        # xorshift32: cheap, deterministic, no dependency on the random module's state.
        seed ^= (seed << 13) & 0xFFFFFFFF
        seed ^= seed >> 17
        seed ^= (seed << 5) & 0xFFFFFFFF
        values.append(seed / 0xFFFFFFFF - 0.5)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    vector = array("f", (v / norm for v in values))
    if vector.itemsize != 4:  # pragma: no cover - 'f' is IEEE float32 on every supported CPU
        raise RuntimeError("array('f') is not float32 on this platform")
    return vector


def embedding_items(value: Any) -> list[Any]:
    """Split ``input`` into items: a string or one token list is a single item."""
    if isinstance(value, list) and value and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    return [value]


def embeddings_body(model: str, items: list[Any], dims: int, encoding_format: str | None, prompt_tokens: int) -> bytes:
    data = []
    for index, item in enumerate(items):
        vector = _embedding_vector(item, dims)
        if encoding_format == "base64":
            if sys.byteorder == "big":
                vector.byteswap()  # the wire format is little-endian float32
            embedding: Any = base64.b64encode(vector.tobytes()).decode("ascii")
        else:
            embedding = vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


# ---------------------------------------------------------------- streaming


class StreamFormat:
    """Builds the SSE events of one streamed chat or text completion.

    Every event shares the envelope (id, object, created, model); with ``include_usage``
    each carries ``"usage": null`` and :meth:`usage` builds the final ``"choices": []`` event.
    """

    def __init__(self, kind: str, response_id: str, created: int, model: str, include_usage: bool) -> None:
        self.kind = kind
        obj = "chat.completion.chunk" if kind == CHAT else "text_completion"
        self._head = (
            f'data: {{"id":{_dumps(response_id)},"object":"{obj}","created":{created},'
            f'"model":{_dumps(model)},"system_fingerprint":"fp_simulated","choices":['
        ).encode()
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def _event(self, choice: dict[str, Any]) -> bytes:
        return self._head + dumps(choice) + self._tail

    @staticmethod
    def annotation() -> bytes:
        """Azure's leading prompt-annotation event."""
        return (
            b"data: "
            + dumps(
                {
                    "id": "",
                    "object": "",
                    "created": 0,
                    "model": "",
                    "prompt_filter_results": PROMPT_FILTER_RESULTS,
                    "choices": [],
                }
            )
            + b"\n\n"
        )

    def role(self, index: int) -> bytes | None:
        """Chat's first event (role + empty content); completions have none."""
        if self.kind != CHAT:
            return None
        return self._event(
            {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    def token(self, index: int, text: str) -> bytes:
        if self.kind == CHAT:
            choice = {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        else:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": None}
        return self._event(choice)

    def finish(self, index: int, reason: str) -> bytes:
        if self.kind == CHAT:
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"text": "", "index": index, "logprobs": None, "finish_reason": reason}
        return self._event(choice)

    def usage(self, prompt: int, completion: int) -> bytes:
        return self._head + b'],"usage":' + _usage_json(prompt, completion).encode() + b"}\n\n"


# ---------------------------------------------------------------- models


def openai_models(deployments: list[tuple[str, str]], created: int) -> bytes:
    """``GET /v1/models``: one entry per deployment name (the name is what ``model`` takes)."""
    return dumps(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "system"}
                for name, _model in deployments
            ],
        }
    )


def azure_models(deployments: list[tuple[str, str]], created: int) -> bytes:
    """``GET /openai/models``: the distinct base models behind the deployments."""
    models = sorted({model for _name, model in deployments})
    return dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": model,
                    "object": "model",
                    "created_at": created,
                    "status": "succeeded",
                    "lifecycle_status": "generally-available",
                    "capabilities": {
                        "chat_completion": True,
                        "completion": True,
                        "embeddings": True,
                        "inference": True,
                        "fine_tune": False,
                    },
                }
                for model in models
            ],
        }
    )
