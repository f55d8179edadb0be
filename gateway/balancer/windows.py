"""How a deployment's RPM and TPM turn into rolling windows.

Azure OpenAI enforces RPM over short windows as well as the minute: about a sixtieth of the
RPM per second and a sixth per ten seconds (600 RPM: an 11th request within one second draws
a 429). TPM is enforced over the minute. The gateway's balancer and the simulated upstream
both take their windows from here, so that "the gateway's limits equal the upstream's" means
exactly the same windows on both sides.

``minute`` is configurable so tests can run a whole "minute" in a second or two; the short
windows scale with it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Window:
    """One rolling window: at most ``limit`` units within any ``seconds``-long span."""

    seconds: float
    limit: int


def request_windows(rpm: int, minute: float = 60.0) -> tuple[Window, ...]:
    """The request windows for an RPM limit: per 1/60, 1/6 and the whole minute.

    A short window's limit is rounded down but never below one request, so a small RPM still
    lets single requests through (Azure does the same: 6 RPM allows one request per 10 s).
    An RPM of 0 means "no request limit" and yields no windows.
    """
    if rpm <= 0:
        return ()
    return (
        Window(minute / 60.0, max(1, rpm // 60)),
        Window(minute / 6.0, max(1, rpm // 6)),
        Window(minute, rpm),
    )


def token_windows(tpm: int, minute: float = 60.0) -> tuple[Window, ...]:
    """The token window for a TPM limit: the minute. A TPM of 0 means "no token limit"."""
    if tpm <= 0:
        return ()
    return (Window(minute, tpm),)
