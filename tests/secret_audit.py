"""Session-wide audit: no secret may appear in anything logged during the tests.

Every log record of the test process is kept, and at the end of the session
the records and every ``*.log`` file below pytest's temporary directory (lab,
MLflow and job logs) are searched for the passwords and tokens the tests made
or that the embedded servers generated. A hit fails the session.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

SECRETS: set[str] = set()


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a bad record must not break the audit
            self.lines.append(str(record.msg))


_handler = _Keep()


def pytest_sessionstart(session: pytest.Session) -> None:
    root = logging.getLogger()
    root.addHandler(_handler)
    if root.level > logging.DEBUG or root.level == logging.NOTSET:
        root.setLevel(logging.DEBUG)


def _generated_secrets(base: Path) -> set[str]:
    found: set[str] = set()
    for path in base.rglob("secrets.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found |= {v for k, v in data.items() if k != "admin_username" and isinstance(v, str)}
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    base = factory.getbasetemp() if factory else None
    secrets = {s for s in SECRETS | (_generated_secrets(base) if base else set()) if len(s) >= 8}
    hits: list[str] = []
    for line in _handler.lines:
        hits += [f"log record: {line[:200]}" for s in secrets if s in line]
    if base:
        for path in base.rglob("*.log"):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            hits += [f"{path}" for s in secrets if s in text]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if hits:
        if reporter:
            reporter.write_line("SECRET AUDIT FAILED: a secret appeared in:", red=True)
            for hit in sorted(set(hits))[:20]:
                reporter.write_line(f"  {hit}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter:
        reporter.write_line(
            f"secret audit: {len(secrets)} secrets, {len(_handler.lines)} log records, no leak"
        )
