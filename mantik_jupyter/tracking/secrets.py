"""Writing files that hold secrets: created with mode 0600, replaced atomically.

Reading them back checks what ssh checks of a private key: a file another user owns
is refused (its owner chose what is in it, e.g. a credential that sends our runs to
their account), and a mode that lets others read it is tightened to 0600.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

from ..errors import LocalStateInvalid

log = logging.getLogger(__name__)


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_private_json(path: Path, data: Any) -> bool:
    """Write ``path`` only if it does not exist, atomically; False if another was first.

    For secrets that two processes may make at the same moment: both must end up using
    the same one.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True))
        os.link(tmp, path)  # fails if the name exists; never a half-written file
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def write_private_json(path: Path, data: Any) -> None:
    write_private(path, json.dumps(data, indent=2, sort_keys=True))


def read_json(path: Path) -> Any:
    """The JSON of a bookkeeping file (no secrets in it); None if missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("Ignoring %s: %s", path, exc)
        return None


def read_private_json(path: Path, what: str, fix: str) -> Any:
    """The JSON of a file that holds secrets; None if there is none.

    ``what`` names the file for people ("The credential store"); ``fix`` says what to
    do when it cannot be used. Raises LocalStateInvalid naming the file.
    """
    try:
        st = path.stat()
        if st.st_uid != os.getuid():
            raise LocalStateInvalid(
                f"{what} {path} belongs to user id {st.st_uid}, not to you (user id "
                f"{os.getuid()}), so it is not used: its owner chose what is in it. "
                "Move it away, or make it yours (chown) if you wrote it."
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, 0o600)
            log.warning(
                "%s %s was open to other users (mode %o); it is now 0600. Change the "
                "passwords in it if others may have read it.",
                what, path, stat.S_IMODE(st.st_mode),
            )  # fmt: skip
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise LocalStateInvalid(
            f"{what} {path} cannot be read ({exc.strerror or exc}). {fix}"
        ) from None
    except UnicodeDecodeError:
        raise LocalStateInvalid(f"{what} {path} is not UTF-8 text. {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # msg and position only: the error's str() is fine today, but the text is secret.
        raise LocalStateInvalid(
            f"{what} {path} is not valid JSON ({exc.msg}: line {exc.lineno}, column "
            f"{exc.colno}). {fix}"
        ) from None
