"""Runtime state of the simulator: deployments, their limiters, faults and counters.

Everything here runs on the server's single event loop (no locks). The HTTP layer
(:mod:`.server`) asks a :class:`Deployment` to admit a request and reads its headers; the
control API mutates it through :class:`SimulatorState`.

Reset contract: ``reset()`` zeroes counters, windows and PTU utilisation and the token
issuance counter. Configuration and active faults stay. A request admitted before the reset
finishes against the counters and meter it started with, so stragglers never leak into the
fresh counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.balancer.windows import request_windows, token_windows
from gateway.proxy.encodings import SUPPORTED_ENCODINGS

from . import arrival
from .arrival import EncodingCache
from .auth import Authenticator
from .config import SKU_PROVISIONED, ConfigError, DeploymentConfig, SimConfig
from .faults import FaultQueue, parse_fault
from .limiter import ArrivalLog, Decision, PtuMeter, StandardLimiter
from .stats import DeploymentStats


class Deployment:
    """One simulated deployment: config, rate-limit state, faults and counters."""

    def __init__(self, config: DeploymentConfig, minute: float, clock: Callable[[], float]) -> None:
        self.minute = minute
        self._clock = clock
        self.faults = FaultQueue()
        for i, fault in enumerate(config.faults):
            self.faults.add(parse_fault(fault, where=f"{config.name}.faults[{i}]"))
        # Which window lengths the stats report: the shapes gateway.balancer.windows gives any
        # non-zero limit (they depend on the minute only), so unlimited deployments still
        # report what they observed.
        self._request_durations = tuple(w.seconds for w in request_windows(60, minute))
        self._token_durations = tuple(w.seconds for w in token_windows(1, minute))
        self.config = config
        self._new_state()

    def _new_state(self) -> None:
        self.stats = DeploymentStats()
        self.log = ArrivalLog(self._request_durations + self._token_durations)
        self._build_limiter()

    def _build_limiter(self) -> None:
        cfg = self.config
        if cfg.sku == SKU_PROVISIONED:
            self.ptu: PtuMeter | None = PtuMeter(cfg.ptu_tokens_per_minute, self.minute, self._clock())
            self.standard: StandardLimiter | None = None
        else:
            self.ptu = None
            self.standard = StandardLimiter(
                self.log,
                request_windows(cfg.rpm, self.minute),
                token_windows(cfg.tpm, self.minute),
            )

    def update(self, config: DeploymentConfig) -> None:
        """Apply a new config; arrivals and utilisation carry over (limits apply to them)."""
        old = self.config
        self.config = config
        if config.sku != old.sku:
            self._build_limiter()
        elif self.ptu is not None:
            self.ptu.reconfigure(config.ptu_tokens_per_minute, self.minute)
        else:
            self._build_limiter()  # the log is kept; only the window limits change
        if config.faults != old.faults:
            self.faults.clear()
            for i, fault in enumerate(config.faults):
                self.faults.add(parse_fault(fault, where=f"{config.name}.faults[{i}]"))

    def reset(self) -> None:
        self._new_state()

    @property
    def encoding_name(self) -> str | None:
        """The tiktoken encoding the arrival charge needs, or None in fast mode."""
        return arrival.encoding_name(self.config)

    def admit(self, now: float, counted: int) -> Decision:
        """Count a request on arrival, or refuse it without consuming capacity."""
        if self.ptu is not None:
            decision = self.ptu.check(now, counted)
            if decision.admitted:
                # The log only feeds the observed-peak stats on PTU deployments.
                self.log.advance(now)
                self.log.add(now, counted)
            return decision
        assert self.standard is not None
        return self.standard.check(now, counted)

    def limit_headers(self, now: float) -> dict[str, str]:
        """``x-ratelimit-remaining-*`` (standard) or utilisation (PTU), as of now.

        An unlimited dimension gets no header, as an upstream without that limit would.
        """
        if self.ptu is not None:
            return {"azure-openai-deployment-utilization": f"{self.ptu.utilization(now):.1f}%"}
        assert self.standard is not None
        requests, tokens = self.standard.remaining()
        headers = {}
        if requests is not None:
            headers["x-ratelimit-remaining-requests"] = str(requests)
        if tokens is not None:
            headers["x-ratelimit-remaining-tokens"] = str(tokens)
        return headers

    def snapshot(self) -> dict[str, Any]:
        self.log.advance(self._clock())
        peak_requests, peak_tokens = self.log.peaks()
        data = self.stats.snapshot(
            {s: peak_requests.get(s, 0) for s in self._request_durations},
            {s: peak_tokens.get(s, 0) for s in self._token_durations},
        )
        if self.ptu is not None:
            data["utilization_pct"] = round(self.ptu.utilization(self._clock()), 3)
        data["faults"] = self.faults.describe()
        return data


class SimulatorState:
    """All deployments plus authentication; the one object the HTTP layer talks to."""

    def __init__(self, config: SimConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.auth = Authenticator(config.api_key, config.azure_ad, clock)
        self.encodings = EncodingCache()
        self.deployments: dict[str, Deployment] = {}
        for dep in config.deployments:
            self.deployments[dep.name] = Deployment(dep, config.minute_seconds, clock)

    def get(self, name: str) -> Deployment | None:
        """The named deployment; auto-created from the defaults if the config allows it."""
        dep = self.deployments.get(name)
        if dep is None and self.config.auto_deployments and name:
            dep = self._create(self.config.new_deployment(name))
        return dep

    def _create(self, config: DeploymentConfig) -> Deployment:
        dep = Deployment(config, self.config.minute_seconds, self.clock)
        self.deployments[config.name] = dep
        return dep

    def upsert(self, name: str, fields: Mapping[str, Any]) -> tuple[Deployment, bool]:
        """Create or update a deployment from a partial field mapping; (deployment, created)."""
        if not isinstance(fields, Mapping):
            raise ConfigError("expected a JSON object of deployment fields")
        if "name" in fields and fields["name"] != name:
            raise ConfigError(f"name: does not match the URL ({name!r})")
        dep = self.deployments.get(name)
        if dep is None:
            return self._create(self.config.new_deployment(name, fields)), True
        dep.update(dep.config.updated(fields, where=f"deployments.{name}"))
        return dep, False

    def needed_encodings(self) -> set[str]:
        """The encodings to load before serving: those of the configured deployments, or all
        the gateway supports when deployments may appear at runtime."""
        if self.config.auto_deployments or not self.deployments:
            return set(SUPPORTED_ENCODINGS)
        return {name for d in self.deployments.values() if (name := d.encoding_name) is not None}

    def reset(self) -> None:
        for dep in self.deployments.values():
            dep.reset()
        self.auth.reset()

    def snapshot(self) -> dict[str, Any]:
        return {
            "deployments": {name: dep.snapshot() for name, dep in self.deployments.items()},
            "token_issued": self.auth.issued,
            "minute_seconds": self.config.minute_seconds,
        }

    def describe(self) -> dict[str, Any]:
        """The live configuration (for ``GET /_sim/config``)."""
        data = self.config.to_dict()
        data["deployments"] = [d.config.to_dict() for d in self.deployments.values()]
        return data
