"""The management API's exception handler: DRF's, plus input the database itself refuses.

Some values pass every serializer and filter and are still refused by the database: a NUL
character in text (PostgreSQL cannot store or compare it) in a slug, a filter or a lookup, or a
number beyond a column's range. Django raises ``DataError`` for those. They are the caller's
input, not the server's failure, so they answer 400 in DRF's shape instead of a 500 (found by the
schemathesis run on PostgreSQL: a tenant slug with a NUL byte).
"""

from __future__ import annotations

from typing import Any

from django.db import DataError
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler; a ``DataError`` becomes a 400 ``{"detail": ...}``."""
    if isinstance(exc, DataError):
        exc = ValidationError(
            {"detail": "A value in the request cannot be stored or searched for (e.g. a NUL character)."}
        )
    return exception_handler(exc, context)
