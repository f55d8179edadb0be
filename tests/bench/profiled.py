"""uvicorn with cProfile switched on and off by signals: ``python -m tests.bench.profiled OUT UVICORN-ARGS...``.

``SIGUSR1`` starts profiling the main thread (the event loop, where the request path runs);
``SIGUSR2`` stops it and writes the stats to ``OUT``. So the profile covers exactly the measured
window, not the imports at start-up or the warm-up.
"""

from __future__ import annotations

import cProfile
import signal
import sys


def main(argv: list[str]) -> None:
    out, uvicorn_args = argv[0], argv[1:]
    profile = cProfile.Profile()

    def start(signum, frame) -> None:
        profile.enable()

    def stop(signum, frame) -> None:
        profile.disable()
        profile.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)

    import uvicorn

    sys.argv = ["uvicorn", *uvicorn_args]
    uvicorn.main()


if __name__ == "__main__":
    main(sys.argv[1:])
