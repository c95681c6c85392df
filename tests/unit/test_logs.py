"""Structured logs: every line carries the object it is about, as key=value or JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from kmesh_plugin import logs


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def emit(fmt: str) -> str:
    stream = io.StringIO()
    logs.setup("info", fmt, stream)
    log = logging.getLogger("kmesh_plugin.test")
    log.info("reconciled", extra={"service": "sample/helloworld", "seconds": 0.0012})
    log.debug("not shown at info")
    log.error("manifest rejected: %s", "bad port", extra={"file": "/m/a b.yaml"})
    return stream.getvalue()


def test_keyvalue_lines_name_their_object(restore_root: None) -> None:
    lines = emit("keyvalue").splitlines()
    assert len(lines) == 2
    assert " level=info logger=kmesh_plugin.test msg=reconciled service=sample/helloworld " \
        "seconds=0.0012" in lines[0]
    # Values with spaces or quotes are quoted so the line still splits into key=value pairs.
    assert 'msg="manifest rejected: bad port" file="/m/a b.yaml"' in lines[1]
    assert lines[0].startswith("ts=") and lines[0].split()[0].endswith("Z")


def test_json_lines_parse_and_keep_extra_fields(restore_root: None) -> None:
    first, second = (json.loads(line) for line in emit("json").splitlines())
    assert first["msg"] == "reconciled" and first["service"] == "sample/helloworld"
    assert first["seconds"] == 0.0012 and first["level"] == "info"
    assert second == {**second, "level": "error", "file": "/m/a b.yaml",
                      "msg": "manifest rejected: bad port"}


def test_exceptions_are_kept_in_one_record(restore_root: None) -> None:
    stream = io.StringIO()
    logs.setup("info", "json", stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("plugin failed", extra={"plugin": "p"})
    (line,) = stream.getvalue().splitlines()
    rec = json.loads(line)
    assert rec["plugin"] == "p" and "ValueError: boom" in rec["exception"]
