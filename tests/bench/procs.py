"""Child processes of the benchmark: started pinned to CPUs, measured through /proc, always stopped.

* ``ProcessGroup`` starts every child of a run (``start``) and stops all of them, in reverse
  order, on ``stop_all`` or when its ``with`` block ends, whatever ended it (an exception,
  Ctrl-C or SIGTERM, which ``__main__`` turns into ``KeyboardInterrupt``).
* Children get their own session, so a Ctrl-C in the terminal reaches only the benchmark,
  which then stops them in order (the gateway first, so it can flush its usage buffer).
* Pinning is ``taskset -c`` when the binary exists, else ``sched_setaffinity`` in the child
  before it executes; ``pin`` re-pins a running process, every thread of it, like
  ``taskset -a -p``.
* ``cpu_seconds`` and ``rss_mb`` read ``/proc/PID/stat`` and ``/proc/PID/status`` (no psutil).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_list(cpus: Iterable[int]) -> str:
    """``{0, 1}`` -> ``"0,1"`` (the taskset syntax)."""
    return ",".join(str(c) for c in sorted(cpus))


def pin(pid: int, cpus: Iterable[int]) -> None:
    """Move every thread of a running process to ``cpus``."""
    wanted = set(cpus)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), wanted)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


class Child:
    """One started process, its log file and the CPUs it was pinned to."""

    def __init__(self, name: str, process: subprocess.Popen, log_path: Path, cpus: tuple[int, ...] | None) -> None:
        self.name = name
        self.process = process
        self.pid = process.pid
        self.log_path = log_path
        self.cpus = cpus

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def pin(self, cpus: Sequence[int]) -> None:
        pin(self.pid, cpus)
        self.cpus = tuple(cpus)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


class Stoppable(Protocol):
    def stop(self) -> object: ...


class ProcessGroup:
    """Every child the benchmark started (or adopted); stops them all, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Stoppable] = []
        self._taskset = shutil.which("taskset")

    @property
    def pinning_tool(self) -> str:
        return "taskset -c" if self._taskset else "sched_setaffinity"

    def adopt(self, child: Stoppable) -> Stoppable:
        """Take charge of stopping something started elsewhere (e.g. a simulator handle)."""
        self.children.append(child)
        return child

    def start(
        self,
        name: str,
        command: Sequence[str],
        *,
        cpus: Sequence[int] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        """Start ``command`` pinned to ``cpus``; stdout and stderr go to ``<log_dir>/<name>.log``."""
        log_path = self.log_dir / f"{name}.log"
        argv = list(command)
        preexec = None
        if cpus is not None:
            if self._taskset:
                argv = [self._taskset, "-c", cpu_list(cpus), *argv]
            else:
                wanted = set(cpus)
                preexec = lambda: os.sched_setaffinity(0, wanted)  # noqa: E731
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                argv,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )
        child = Child(name, process, log_path, tuple(cpus) if cpus is not None else None)
        self.children.append(child)
        return child

    def stop(self, child: Stoppable) -> object:
        """Stop one child now (and forget it)."""
        if child in self.children:
            self.children.remove(child)
        return child.stop()

    def stop_all(self) -> None:
        """Stop every child still running, newest first. Never raises."""
        while self.children:
            child = self.children.pop()
            try:
                child.stop()
            except BaseException:  # keep stopping the others, even on a second Ctrl-C
                pid = getattr(child, "pid", None)
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_until(check, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    """Call ``check()`` until it returns true; ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)
