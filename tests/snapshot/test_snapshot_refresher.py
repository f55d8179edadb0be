"""The snapshot follows the database's configuration version, with Redis as a hint only."""

from __future__ import annotations

import pytest

from gateway import snapshot
from gateway.snapshot import Snapshot
from gateway.snapshot.refresher import SnapshotRefresher


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Database:
    """The configuration version row."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.reads = 0

    def read(self) -> int:  # sync, as the ORM read it stands for
        self.reads += 1
        return self.version


class Mirror:
    """The Redis copy (``VersionMirror``'s interface)."""

    def __init__(self, value: int | None) -> None:
        self.value = value
        self.down = False
        self.reachable = True
        self.writes: list[int] = []

    async def read(self) -> int | None:
        self.reachable = not self.down
        return None if self.down else self.value

    async def write(self, version: int) -> None:
        if not self.down:
            self.value = version
            self.writes.append(version)


@pytest.fixture
def world(monkeypatch):
    """A refresher polling every 0.5 s, the database every 1 s; rebuilding installs the row's version."""
    before = snapshot.current()
    clock, database, mirror = Clock(), Database(5), Mirror(5)
    refresher = SnapshotRefresher(0.5, database.read, mirror=mirror, database_seconds=1.0, clock=clock)
    builds: list[int] = []

    async def load_now() -> Snapshot:
        built = Snapshot(version=database.version)
        snapshot.install(built)
        builds.append(built.version)
        return built

    monkeypatch.setattr(refresher, "load_now", load_now)
    snapshot.install(Snapshot(version=5))
    yield refresher, clock, database, mirror, builds
    snapshot.install(before)


async def tick(refresher: SnapshotRefresher, clock: Clock, seconds: float = 0.5) -> None:
    clock.now += seconds
    await refresher.poll()


async def test_a_change_that_bypassed_redis_is_read_from_the_database_within_its_interval(world):
    refresher, clock, database, mirror, builds = world
    await tick(refresher, clock)  # settles: the mirror agrees with the row
    database.version = 6  # revoked from a shell without REDIS_URL: the mirror still says 5
    await tick(refresher, clock)
    await tick(refresher, clock)
    assert snapshot.current().version == 6 and builds == [6]
    assert mirror.value == 6, "the mirror is repaired, so the other processes see it at their next GET"


async def test_a_change_through_redis_is_seen_at_the_next_poll(world):
    refresher, clock, database, mirror, _ = world
    await tick(refresher, clock, 1.0)
    reads = database.reads
    database.version = mirror.value = 7  # the admin's save: row, then mirror
    await tick(refresher, clock, 0.5)
    assert snapshot.current().version == 7 and database.reads == reads + 1


async def test_without_a_change_the_database_is_read_once_per_interval_not_every_poll(world):
    refresher, clock, database, _, builds = world
    for _ in range(8):  # 4 seconds
        await tick(refresher, clock)
    assert database.reads == 4 and builds == []


async def test_with_redis_down_the_database_still_brings_changes_and_nothing_waits_on_redis_writes(world):
    refresher, clock, database, mirror, _ = world
    mirror.down = True
    database.version = 8
    await tick(refresher, clock, 1.0)
    assert snapshot.current().version == 8 and mirror.writes == []


async def test_a_mirror_ahead_of_the_database_is_corrected_not_chased(world):
    refresher, clock, _, mirror, builds = world
    mirror.value = 40  # the database was restored from a backup; Redis kept a later number
    for _ in range(6):
        await tick(refresher, clock)
    assert mirror.value == 5 and builds == [], "the row wins, and no rebuild loop follows"


async def test_without_redis_the_database_is_read_every_poll(monkeypatch):
    before = snapshot.current()
    database = Database(3)
    refresher = SnapshotRefresher(0.5, database.read)

    async def load_now() -> Snapshot:
        snapshot.install(Snapshot(version=database.version))
        return snapshot.current()

    monkeypatch.setattr(refresher, "load_now", load_now)
    snapshot.install(Snapshot(version=3))
    try:
        await refresher.poll()
        database.version = 4
        await refresher.poll()
        assert database.reads == 2 and snapshot.current().version == 4
    finally:
        snapshot.install(before)
