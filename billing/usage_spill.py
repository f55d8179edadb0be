"""Usage records the database cannot take yet, kept on disk until it can.

Files of JSON lines, one record each, in ``USAGE_SPILL_DIR`` (``var/usage-spill``): append-only,
``fsync``'d after each batch, named ``usage-<database>-<pid>-<random>.jsonl``, where
``<database>`` is a short hash of the database they are meant for, so a process never replays
records into another database (a test database, a new ``DATABASE_URL``).

Ownership is an exclusive ``flock``, which the kernel releases when its holder dies. A writer
holds it while it appends a batch; a replayer for as long as it replays a file. A process
appends to its current file when it can lock it, and starts a new one when it cannot (someone is
replaying it, or has replayed and deleted it). Any process replays every file it can lock: its
own, and those of processes that died. A file is deleted once each of its records was written
or parked. Records are idempotent on their request id, so a file replayed twice (a crash
between its last batch and its deletion, or a replay resumed by another process) adds nothing.

Replay progress is kept in memory per file, so an outage that interrupts a replay resumes it
where it stopped; after a restart a file is replayed from its start (idempotent, see above).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from billing.usage_store import Record, record_jsonable

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"


class SpillDirectory:
    """Append batches of records to this process's spill file; replay every file it can lock.

    ``tag`` names the database the records are for (a callable, read at each use, because the
    test runner renames the database after start-up). Thread-safe; blocking: call from threads.
    """

    def __init__(self, path: Path, tag: Callable[[], str]) -> None:
        self.path = Path(path)
        self.tag = tag
        self._lock = threading.Lock()
        self._current: Path | None = None
        self._offsets: dict[str, int] = {}  # file name -> bytes already replayed

    # -- writing -------------------------------------------------------------------------------

    def append(self, records: list[Record]) -> None:
        """Write ``records`` durably (fsync) or raise ``OSError`` having written none of them."""
        if not records:
            return
        data = b"".join(_encode(record) for record in records)
        with self._lock:
            fd = self._locked_file()
            try:
                size = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                except OSError:
                    # A torn line would spoil the next record appended after it: cut it off.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)  # releases the lock: the file may be replayed from now on

    def _locked_file(self) -> int:
        """A descriptor on this process's current file, locked; a new file if that one is taken or gone."""
        if self._current is not None:
            try:
                fd = os.open(self._current, os.O_WRONLY | os.O_APPEND)
            except FileNotFoundError:
                pass
            else:
                if _try_lock(fd) and os.fstat(fd).st_nlink > 0:
                    return fd
                os.close(fd)
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / f"usage-{self.tag()}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        # Created and locked under a name replayers ignore, then renamed: a replayer can never
        # take (and delete) a new file in the moment between its creation and our lock.
        staging = path.with_suffix(".new")
        fd = os.open(staging, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(staging, path)
        _fsync_directory(self.path)
        self._current = path
        return fd

    # -- replaying -----------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """Spill files for this database, whoever wrote them."""
        try:
            return sorted(self.path.glob(f"usage-{self.tag()}-*{SUFFIX}"))
        except OSError:
            return []

    def replay(self, write: Callable[[list[Record]], Any], batch_size: int, max_batches: int) -> tuple[int, bool]:
        """Hand up to ``max_batches`` batches of spilled records to ``write``, deleting each file
        once replayed whole. Returns (records replayed, whether more are left). An exception from
        ``write`` (the database went away again) stops the replay where it was and propagates."""
        replayed = batches = 0
        for path in self.files():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if not _try_lock(fd) or os.fstat(fd).st_nlink == 0:
                    continue  # being written or replayed by someone else, or already done
                with os.fdopen(fd, "rb", closefd=False) as stream:
                    stream.seek(self._offsets.get(path.name, 0))
                    while True:
                        if batches >= max_batches:
                            return replayed, True
                        start = stream.tell()
                        records = _read_batch(stream, batch_size, path)
                        if records is None:
                            break
                        try:
                            write(records)
                        except BaseException:
                            self._offsets[path.name] = start
                            raise
                        self._offsets[path.name] = stream.tell()
                        batches += 1
                        replayed += len(records)
                os.unlink(path)
                self._offsets.pop(path.name, None)
            finally:
                os.close(fd)
        return replayed, False


def _read_batch(stream, batch_size: int, path: Path) -> list[Record] | None:
    """Up to ``batch_size`` records; None at the end of the file."""
    records: list[Record] = []
    lines = 0
    while lines < batch_size:
        line = stream.readline()
        if not line:
            break
        lines += 1
        if not line.endswith(b"\n"):
            # Only a writer that died mid-write leaves this: its batch was never confirmed.
            log.warning("ignoring a torn last line in %s (%d bytes)", path.name, len(line))
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            log.error("ignoring an unreadable line in %s: %r", path.name, line[:200])
    return records if lines else None


def _encode(record: Record) -> bytes:
    return json.dumps(record_jsonable(record), separators=(",", ":")).encode() + b"\n"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _fsync_directory(path: Path) -> None:
    """Make a new file's name durable too, not only its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
