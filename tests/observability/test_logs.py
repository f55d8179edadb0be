"""The log formats and the background writer alone."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from gateway.observability.logs import (
    REQUEST_FIELDS,
    BackgroundStreamHandler,
    JsonFormatter,
    RequestLine,
    request_json,
    request_log_level,
)

FIELDS = {
    "request_id": "req_abc",
    "route": "chat",
    "tenant": "team-a",
    "key_prefix": "sk-gw-abcdef",
    "model": 'gpt-4o "quoted"\nsecond line',
    "deployment": "east/chat",
    "status": 502,
    "outcome": "upstream_error",
    "error_code": None,
    "latency_ms": 1234.56,
    "ttft_ms": None,
    "queue_wait_ms": 0.0,
    "retries": 2,
    "attempts": ["east/chat:failed", "west/chat:rate_limited"],
    "streamed": True,
    "priority": 5,
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "cost": "0",
    "client_ip": None,
}


def record(msg, level=logging.INFO, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("gateway.request", level, "", 0, msg, (), None)
    for name, value in extra.items():
        setattr(rec, name, value)
    return rec


def test_the_request_lines_template_writes_what_the_json_module_would():
    assert tuple(FIELDS) == REQUEST_FIELDS
    parsed = json.loads(request_json(FIELDS))
    assert parsed == {**FIELDS, "latency_ms": 1234.6}  # one decimal, as the text line
    extra = {**FIELDS, "unexpected": 1}
    assert json.loads(request_json(extra)) == extra  # not the request line's fields: the json module


def test_a_json_request_line_is_one_object_on_one_line():
    line = JsonFormatter().format(record(RequestLine(FIELDS)))
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "request"
    assert parsed["level"] == "INFO" and parsed["logger"] == "gateway.request"
    assert parsed["time"].endswith("Z")
    assert parsed["model"] == FIELDS["model"]
    assert parsed["attempts"] == FIELDS["attempts"]


def test_other_lines_carry_their_request_id_extras_and_exception():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        rec = record("request %s failed", logging.ERROR, request_id="req_xyz", upstream="east")
        rec.args = ("req_xyz",)
        rec.exc_info = sys.exc_info()
    parsed = json.loads(JsonFormatter().format(rec))
    assert parsed["message"] == "request req_xyz failed"
    assert parsed["request_id"] == "req_xyz"
    assert parsed["upstream"] == "east"
    assert "RuntimeError: boom" in parsed["exception"]


def test_the_text_request_line_quotes_what_could_forge_a_field():
    text = str(RequestLine(FIELDS))
    assert "\n" not in text
    assert text.startswith("request request_id=req_abc route=chat tenant=team-a")
    assert 'model="gpt-4o \\"quoted\\"\\nsecond line"' in text
    assert "attempts=east/chat:failed,west/chat:rate_limited" in text
    assert "error_code" not in text and "ttft_ms" not in text  # absent values are left out
    assert "latency_ms=1234.6" in text


@pytest.mark.parametrize(
    ("setting", "level"), [("INFO", logging.INFO), ("debug", logging.DEBUG), ("off", None), ("", None), ("none", None)]
)
def test_the_request_log_level_setting(setting, level):
    assert request_log_level(setting) == level


def test_an_unknown_request_log_level_is_refused():
    with pytest.raises(ValueError):
        request_log_level("LOUD")


def test_the_background_handler_writes_every_line_in_order_off_the_callers_thread():
    class Stream(io.StringIO):
        threads: set[str] = set()

        def write(self, text: str) -> int:
            self.threads.add(threading.current_thread().name)
            return super().write(text)

    stream = Stream()
    handler = BackgroundStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.synchronous = False  # the suite writes synchronously; this instance does not
    for i in range(500):
        handler.emit(record(f"line {i}"))
    handler.flush()
    assert stream.getvalue().splitlines() == [f"line {i}" for i in range(500)]
    assert stream.threads == {"log-writer"}
    handler.close()


def test_the_background_handler_drops_and_counts_beyond_its_capacity():
    gate = threading.Event()

    class Blocked(io.StringIO):
        def write(self, text: str) -> int:
            gate.wait(5)  # the log pipe is stuck
            return super().write(text)

    stream = Blocked()
    handler = BackgroundStreamHandler(stream, capacity=10)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.synchronous = False
    for i in range(100):
        handler.emit(record(f"line {i}"))  # returns at once although nothing can be written
    assert handler.dropped > 0
    gate.set()
    handler.flush()  # the stuck lines are written
    handler.emit(record("after"))
    handler.flush()
    text = stream.getvalue()
    assert "lines dropped" in text
    assert text.splitlines()[-1] == "after"
    handler.close()
