"""No exception message reaches the daemon's log (journal or stderr): it may name an address or
a subject. The traceback and the exception's type still do."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from agent import daemon

ADDRESS, SUBJECT = "198.18.9.7", "privacy-dave-991"


def _fail() -> None:
    try:
        {}[ADDRESS]
    except KeyError as exc:
        raise ValueError(f"entry of {SUBJECT}") from exc


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restored_logging")
def test_the_journal_gets_the_traceback_not_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # As under the unit: stderr is the journal stream.
    monkeypatch.setattr(daemon, "stderr_is_the_journal", lambda: True)
    daemon.setup_logging()
    (handler,) = logging.getLogger().handlers
    sent: list[dict[str, Any]] = []

    def send(MESSAGE: str, **fields: Any) -> None:  # journal.send's own parameter name
        sent.append({"MESSAGE": MESSAGE, **fields})

    monkeypatch.setattr(handler, "send", send)
    try:
        _fail()
    except ValueError:
        logging.getLogger("vicifast-agent.test").exception("engine failure")
    (fields,) = sent
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    assert ADDRESS not in text
    assert SUBJECT not in text
    assert "EXCEPTION_INFO" not in fields
    assert "KeyError" in fields["EXCEPTION_TEXT"]
    assert "ValueError" in fields["EXCEPTION_TEXT"]
    assert "_fail" in fields["EXCEPTION_TEXT"]  # the frames are kept


@pytest.mark.usefixtures("restored_logging")
def test_stderr_gets_the_traceback_not_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    daemon.setup_logging()
    try:
        _fail()
    except ValueError:
        logging.getLogger("vicifast-agent.test").exception("local request failed")
    text = stream.getvalue()
    assert "local request failed" in text
    assert "KeyError: (message withheld)" in text
    assert ADDRESS not in text
    assert SUBJECT not in text


def test_an_os_error_keeps_its_errno() -> None:
    from agent.logprivacy import describe_exception  # noqa: PLC0415

    try:
        raise FileNotFoundError(2, "No such file", f"/var/lib/x/{SUBJECT}")
    except OSError as exc:
        text = describe_exception(exc)
    assert "FileNotFoundError (errno 2)" in text
    assert SUBJECT not in text
