"""Azure's arrival charge, as the simulated upstream imitates it.

Azure OpenAI counts a request against a deployment the moment it arrives, before generating
anything: the prompt's tokens plus a completion allowance,
``(max_completion_tokens or max_tokens or default) × max(n, best_of)`` (``best_of`` is a
completions parameter; embeddings generate nothing). A standard deployment's TPM windows keep that
charge; a provisioned deployment's utilisation is corrected once the real size is known
(``PtuMeter.settle``).

The prompt is counted by the gateway's own counter, :func:`gateway.proxy.tokens.count_prompt_tokens`
(tiktoken o200k/cl100k by model family with o200k for unknown names, the cookbook's chat, image
and tool formulas, the same ``fast`` mode), and the allowance by
:func:`gateway.proxy.tokens.completion_allowance`. So a gateway whose deployments mirror the
simulator's limits reserves exactly what the simulator charges, whatever the prompt holds (text,
images, tools, token lists), and "the upstream answers no 429" is a property the tests can hold
the balancer to. What the simulator does differently, deliberately:

* the default allowance of a request that sets no limit is the deployment's
  ``default_max_tokens`` (the gateway uses its own setting, capped by the deployment's
  ``max_output_tokens``); completions default to 16, the API's default, on both sides;
* the encoding is chosen from the deployment's ``model`` alone (the model it runs), where the
  gateway has a client-facing name and an ``upstream_model`` hint;
* encodings are loaded off the event loop by :class:`EncodingCache` (the gateway warms them in
  its snapshot builder's thread).

A real upstream does not count with the gateway's counter: Azure documents the inputs of its
arrival estimate (prompt text, ``max_tokens``, ``best_of``) but not how it counts the text, and
the figure it charges differs from tiktoken's (characters / 4 came out 13 % above tiktoken for
plain English, far below it for CJK). ``arrival_count`` (``tiktoken`` | ``characters``) and
``arrival_factor`` configure that difference, so tests and rehearsals exercise a gateway that
must learn it; left at their defaults the charge is the gateway's own count, as before. The
usage the simulator reports keeps the ``token_estimate`` count either way (billing is exact).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from gateway.proxy import encodings, tokens

from .config import ARRIVAL_SAME, ARRIVAL_TIKTOKEN, DeploymentConfig


def _arrival_mode(config: DeploymentConfig) -> str:
    """The ``gateway.proxy.tokens`` mode of the arrival count."""
    if config.arrival_count == ARRIVAL_SAME:
        return config.token_estimate
    return tokens.MODE_TIKTOKEN if config.arrival_count == ARRIVAL_TIKTOKEN else tokens.MODE_FAST


def encoding_name(config: DeploymentConfig) -> str | None:
    """The tiktoken encoding the deployment's counts need, or None when both are ``fast``."""
    if config.token_estimate == tokens.MODE_FAST and _arrival_mode(config) == tokens.MODE_FAST:
        return None
    return tokens.encoding_name_for(config.model)


def charge(kind: str, body: dict[str, Any], config: DeploymentConfig) -> tuple[int, int]:
    """``(prompt tokens, tokens charged on arrival)`` for ``body`` on a deployment.

    ``kind`` is ``chat``, ``completions`` or ``embeddings``; ``body`` has passed the server's shape
    check. The deployment's encoding must already be loaded (``EncodingCache.load``): otherwise
    the count would load it, blocking the event loop for a few hundred milliseconds.
    """
    prompt = tokens.count_prompt_tokens(kind, body, config.model, mode=config.token_estimate)
    mode = _arrival_mode(config)
    counted = prompt if mode == config.token_estimate else tokens.count_prompt_tokens(kind, body, config.model, mode)
    if config.arrival_factor != 1.0:
        counted = math.ceil(counted * config.arrival_factor)
    return prompt, counted + tokens.completion_allowance(kind, body, config.default_max_tokens)


class EncodingCache:
    """Loads tiktoken encodings (``gateway.proxy.encodings``) in a worker thread, once each.

    Used from one event loop only (the simulator's); concurrent first requests share one load,
    and a failed load may be retried by a later request.
    """

    def __init__(self) -> None:
        self._ready: set[str] = set()
        self._pending: dict[str, asyncio.Future[Any]] = {}

    def ready(self, name: str) -> bool:
        """Whether ``name`` is loaded, so counting with it does not block."""
        return name in self._ready

    async def load(self, name: str) -> None:
        """Load ``name`` in the default executor unless it already is."""
        if name in self._ready:
            return
        future = self._pending.get(name)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(None, encodings.get_encoding, name)
            self._pending[name] = future
        try:
            await asyncio.shield(future)
        finally:
            if future.done():
                self._pending.pop(name, None)
        self._ready.add(name)
