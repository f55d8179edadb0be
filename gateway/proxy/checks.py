"""Checks a proxied request must pass before it may take capacity, and the plan to forward it.

Model known and allowed, client address allowed, the fields the gateway relies on usable
(``gateway.proxy.fields``), the priority within the key's privilege, ``max_tokens`` within the
tenant's cap, the prompt within a deployment's context window. Then the demand to reserve
(prompt tokens + completion allowance) and the body to send upstream.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from django.conf import settings

from gateway.balancer.dispatcher import Demand
from gateway.proxy import errors, tokens
from gateway.proxy.client_address import address_parse
from gateway.proxy.context import RequestContext
from gateway.proxy.fields import PROMPT_FIELD, check_fields
from gateway.proxy.jsonbody import JsonBody
from gateway.proxy.routes import CHAT, EMBEDDINGS, Route
from gateway.snapshot.types import DeploymentView, KeyView


@dataclass(slots=True)
class ForwardPlan:
    route: Route
    model: str
    payload: dict
    body: bytes  # what goes upstream (model rewritten later per OpenAI-compatible endpoint)
    candidates: tuple[DeploymentView, ...]  # deployments whose context window fits, tier order
    demand: Demand
    stream: bool
    client_wants_usage: bool


class RequestChecks:
    """The rules of one request, in order; pure (no I/O), so big bodies can run them in a thread."""

    def __init__(self, route: Route, key: KeyView, body: JsonBody, ctx: RequestContext, headers=()) -> None:
        self.route, self.key, self.body, self.ctx = route, key, body, ctx
        self.payload = body.payload
        self.headers = headers  # the client's (name, value) pairs, names lower-case

    def run(self, snap) -> ForwardPlan:
        """The forward plan, or a GatewayError (400/403/404) naming what is wrong."""
        route, payload, ctx = self.route, self.payload, self.ctx
        model = route.model or payload.get("model")
        if not isinstance(model, str) or not model:
            raise errors.bad_request("You must provide a model parameter.", param="model", code="missing_model")
        ctx.model = model
        deployments = snap.deployments_by_model.get(model)
        if not deployments or not self.model_allowed(model):
            raise errors.not_found(
                f"The model '{model}' does not exist or you do not have access to it.", code="model_not_found"
            )
        self.check_client_address()
        check_fields(route.operation, payload)

        ctx.priority = self.take_priority()
        stream = payload.get("stream") is True and route.operation != EMBEDDINGS
        ctx.streamed = stream
        self.apply_token_cap()
        options = payload.get("stream_options")  # an object or None: check_fields made sure
        client_wants_usage = bool(options and options.get("include_usage")) if stream else True
        if stream and not client_wants_usage:
            # Always learn the usage from the upstream; the extra chunk is removed on the way back.
            self.body.set("stream_options", {**(options or {}), "include_usage": True})

        first = deployments[0]
        field = PROMPT_FIELD[route.operation]
        try:
            prompt = tokens.count_prompt_tokens(
                route.operation, payload, model, mode=first.token_estimate, family_hint=first.upstream_model
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise errors.bad_request(f"Could not read the request's {field}: {exc}.", param=field) from None
        explicit = self.explicit_completion_tokens()
        default_allowance = min(first.max_output_tokens, settings.GATEWAY["DEFAULT_COMPLETION_ALLOWANCE"])
        allowance = tokens.completion_allowance(route.operation, payload, default_allowance)
        needed = prompt + explicit
        fits = tuple(d for d in deployments if needed <= d.context_window)
        if not fits:
            largest = max(d.context_window for d in deployments)
            raise errors.bad_request(
                f"This model's maximum context length is {largest} tokens. However, you requested {needed} tokens "
                f"({prompt} in the prompt, {explicit} for the completion). Please reduce the length of the prompt "
                "or the completion.",
                param=field,
                code="context_length_exceeded",
            )
        ctx.prompt_tokens = prompt
        ctx.tokens_estimated = True  # until the upstream reports usage
        demand = Demand(
            model=model,
            prompt_tokens=prompt,
            allowance=allowance,
            context_tokens=needed,
            priority=ctx.priority,
            tenant=self.key.tenant.slug,
            timeout=self.queue_timeout(),
        )
        return ForwardPlan(route, model, payload, self.body.encoded(), fits, demand, stream, client_wants_usage)

    def model_allowed(self, model: str) -> bool:
        tenant_models, key_models = self.key.tenant.allowed_models, self.key.allowed_models
        return (not tenant_models or model in tenant_models) and (not key_models or model in key_models)

    def check_client_address(self) -> None:
        """403 unless the tenant's networks admit the client. With an allow or a deny list, an
        address that cannot be known (no peer, or a trusted proxy's unreadable X-Forwarded-For)
        is refused too: the policy cannot be checked, so it fails closed."""
        tenant = self.key.tenant
        if not (tenant.ip_allow or tenant.ip_deny):
            return
        address = address_parse(self.ctx.client_ip) if self.ctx.client_ip else None
        if address is None:
            raise errors.forbidden(
                "The client address could not be determined, and this team accepts requests only from "
                "the networks it lists.",
                code="ip_not_allowed",
            )
        if any(address in net for net in tenant.ip_deny) or (
            tenant.ip_allow and not any(address in net for net in tenant.ip_allow)
        ):
            raise errors.forbidden(f"Requests from {address} are not allowed for this team.", code="ip_not_allowed")

    def take_priority(self) -> int:
        """The queue priority (lower is served first): the body's ``priority``, removed before
        forwarding, but never better than the key's ``best_priority`` (a better ask is served at the
        key's best: a client cannot buy its way past other tenants, nor evict their waiting
        requests from a full queue); without one, the key's default."""
        key = self.key
        if "priority" not in self.payload:
            return key.default_priority
        value = self.body.pop("priority")  # an int in range or None: check_fields made sure
        if value is None:
            return key.default_priority
        return max(value, key.best_priority)

    def explicit_completion_tokens(self) -> int:
        """Completion tokens the client asked for explicitly (for the context-window check)."""
        if self.route.operation == EMBEDDINGS:
            return 0
        value = self.payload.get("max_completion_tokens") or self.payload.get("max_tokens") or 0
        return value if isinstance(value, int) and value > 0 else 0

    def apply_token_cap(self) -> None:
        """Hold max_tokens within the tenant's cap: refuse a larger ask, set the cap when none is given."""
        cap = self.key.tenant.max_tokens_cap
        if not cap or self.route.operation == EMBEDDINGS:
            return
        for field in ("max_completion_tokens", "max_tokens"):
            value = self.payload.get(field)
            if value is not None:
                if value > cap:  # a positive int: check_fields made sure
                    raise errors.bad_request(
                        f"'{field}' is {value}, above this team's cap of {cap}.",
                        param=field,
                        code="max_tokens_above_cap",
                    )
                return
        self.body.set("max_completion_tokens" if self.route.operation == CHAT else "max_tokens", cap)

    def queue_timeout(self) -> float:
        """How long the request may wait for capacity: the configured limit, and never longer than
        the client's own read timeout (the SDK announces it in X-Stainless-Read-Timeout)."""
        timeout = settings.GATEWAY["QUEUE_TIMEOUT_SECONDS"]
        for name, value in self.headers:
            if name == b"x-stainless-read-timeout":
                with contextlib.suppress(ValueError):
                    timeout = min(timeout, max(float(value) - 1.0, 0.0))
        return timeout
