"""A statement document (``billing.statements.statement_document``) as CSV or JSON.

The CSV is one table a spreadsheet opens as is: a ``section`` column says what each row is
(``usage`` by model and key, ``provisioned`` per PTU deployment, ``total``), and money is written
as the exact decimal text the statement holds.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from django.http import HttpResponse

FORMATS = ("csv", "json")
CSV_COLUMNS = (
    "section",
    "model",
    "key",
    "key_prefix",
    "deployment",
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "total_tokens",
    "ptu_tokens",
    "deployment_tokens",
    "share",
    "fixed_cost",
    "cost",
)


def statement_csv(document: dict[str, Any]) -> str:
    out = io.StringIO()
    out.write(f"# statement {document['tenant']} {document['month']} ({document['status']})\n")
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for line in document["lines"]:
        writer.writerow({"section": "usage", **line})
    for share in document["provisioned"]:
        writer.writerow({"section": "provisioned", **share, "total_tokens": share["tokens"], "cost": share["charge"]})
    totals = document["totals"]
    writer.writerow({"section": "total payg", **totals, "cost": totals["payg_cost"]})
    writer.writerow({"section": "total provisioned", "cost": totals["ptu_cost"]})
    writer.writerow({"section": "total", **totals, "cost": totals["total_cost"]})
    return out.getvalue()


def statement_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"


def statement_text(document: dict[str, Any], fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")
    return statement_csv(document) if fmt == "csv" else statement_json(document)


def statement_response(document: dict[str, Any], fmt: str) -> HttpResponse:
    """The statement as a download named ``statement-<tenant>-<YYYY-MM>.<fmt>``."""
    content_type = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    response = HttpResponse(statement_text(document, fmt), content_type=content_type)
    name = f"statement-{document['tenant']}-{document['month']}.{fmt}"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
