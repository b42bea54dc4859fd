"""Exceptions are logged by type and frames, never by message (messages may quote patient data)."""

from __future__ import annotations

import contextlib
import logging

import pydicom
import pytest

from service.log_safety import describe_exception

SENTINEL = "SENTINEL^PATIENT^NAME"


def parse_name(value: str) -> None:
    raise ValueError(f"invalid value for VR PN: {value!r}")


def wrapped(value: str) -> None:
    try:
        parse_name(value)
    except ValueError as exc:
        raise RuntimeError(f"could not read {value}") from exc


def test_the_description_names_type_and_frames_but_never_the_message():
    with pytest.raises(RuntimeError) as caught:
        wrapped(SENTINEL)
    text = describe_exception(caught.value, depth=12)
    assert SENTINEL not in text and "invalid value" not in text
    assert text.startswith("RuntimeError at test_log_safety.py:")
    assert "in wrapped" in text and "caused by ValueError at test_log_safety.py:" in text and "in parse_name" in text
    one = describe_exception(caught.value)
    assert one.count(" < ") == 0 and "caused by" not in one and one.endswith("in wrapped")


def test_a_library_error_quoting_a_dataset_value_is_described_without_it():
    """A real pydicom error whose message quotes the bad value (checked), described without it."""
    ds = pydicom.Dataset()
    with pytest.raises(ValueError) as caught:
        with pydicom.config.strict_reading():
            pydicom.valuerep.validate_value("UI", SENTINEL, pydicom.config.RAISE)
            ds.StudyInstanceUID = SENTINEL
    assert SENTINEL in str(caught.value)  # what a plain traceback would have logged
    described = describe_exception(caught.value, depth=20)
    assert SENTINEL not in described and described.startswith("ValueError at ")


def test_the_app_logs_an_unexpected_triage_error_without_its_message(monkeypatch, caplog):
    """The HTTP edge's 500 path: JSON `internal_error` answer, a log line with the frames, no message."""
    from starlette.testclient import TestClient

    from service.http import routes as app_module
    from service.settings import load_settings

    class Broken:
        def admitted(self) -> contextlib.nullcontext[None]:
            return contextlib.nullcontext()

        async def triage(self, payload: bytes, admit: bool = True, keep_source: bool = False) -> None:
            parse_name(SENTINEL)

    class Edge:
        cascade, settings = Broken(), load_settings(environ={})

    monkeypatch.setattr(app_module, "_edge", lambda: Edge())
    with caplog.at_level(logging.ERROR, logger="ptx.app"):
        answer = TestClient(app_module.http).post("/triage", content=b"DICM",
                                                  headers={"content-type": "application/dicom"})
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal_error"
    logged = "\n".join(record.getMessage() + (str(record.exc_info) if record.exc_info else "")
                       for record in caplog.records)
    assert "triage failed: ValueError at test_log_safety.py:" in logged and "in parse_name" in logged
    assert SENTINEL not in logged and SENTINEL not in answer.text
