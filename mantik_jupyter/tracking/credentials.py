"""Tracking credentials and the file that stores them, one entry per tracking URI.

The store is a JSON file with mode 0600 on the lab's machine. Nothing in here
ever returns a secret to a caller that would send it to a browser: faces get
``Credential.describe()``, which holds the user name only.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import InvalidRequest, LocalStateInvalid
from .secrets import read_private_json, write_private_json

STORE_NAME = "The credential store"
FIX_STORE = "Correct it, or move it away and log in again."
FIX_ENTRY = "Log in again (that replaces the entry) or log out (that removes it)."


@dataclass(frozen=True)
class Credential:
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.token:
            return
        if not self.username or not self.password:
            raise InvalidRequest(
                "A tracking credential needs a username and a password, or a token."
            )

    def auth_header(self) -> str:
        if self.token:
            return f"Bearer {self.token}"
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def describe(self) -> dict[str, str | None]:
        return {"username": self.username or ("token" if self.token else None)}

    def env(self) -> dict[str, str]:
        """The MLflow client's environment variables for this credential."""
        if self.token:
            return {"MLFLOW_TRACKING_TOKEN": self.token}
        assert self.username is not None and self.password is not None
        return {
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Credential:
        return cls(
            username=data.get("username"),
            password=data.get("password"),
            token=data.get("token"),
        )


def credential_from_env() -> Credential | None:
    """``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``, if set.

    With both set, the user name and password win, as in MLflow's own client: the lab
    and the kernels and jobs it starts must present the same identity.
    """
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return Credential(username=user, password=password)
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return Credential(token=token)
    return None


def normalize_uri(uri: str) -> str:
    return uri.rstrip("/")


def split_credential(uri: str) -> tuple[str, Credential | None]:
    """The URI without a ``user:password@`` written into it, and that credential.

    The URI is shown (status, messages, logs) and keys the credential store; the
    password must be neither.
    """
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if parts.username and parts.password:
        return bare, Credential(username=unquote(parts.username), password=unquote(parts.password))
    return bare, None


class CredentialStore:
    """Credentials by tracking URI in a 0600 JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._cache: tuple[tuple[int, int], dict[str, dict[str, str]]] | None = None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Held while reading, changing and writing the file back: the lab, `mantik login`
        and kernels write it too, and a change made between our read and our write was
        lost (three processes logging in at once kept 255 of 600 entries)."""
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(
                    self.path.with_name(f".{self.path.name}.lock"),
                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                    0o600,
                )
            except OSError as exc:
                raise self._unwritable(exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._cache = None  # read what the others wrote, whatever its time stamp
                yield
            finally:
                os.close(fd)

    def _load(self) -> dict[str, dict[str, str]]:
        # Every proxied request looks its credential up: re-read the file only when it
        # changed (another process, e.g. `mantik login`, may write it).
        try:
            st = self.path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise LocalStateInvalid(
                f"{STORE_NAME} {self.path} cannot be read ({why}). {FIX_STORE}"
            ) from None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._cache
        if cached is not None and cached[0] == stamp:
            return dict(cached[1])
        data = read_private_json(self.path, STORE_NAME, FIX_STORE)
        if data is None:
            data = {}
        elif not isinstance(data, dict):
            raise LocalStateInvalid(
                f"{STORE_NAME} {self.path} holds a JSON {type(data).__name__}, not an object "
                f"keyed by tracking URI. {FIX_STORE}"
            )
        self._cache = (stamp, data)
        return dict(data)

    def get(self, uri: str) -> Credential | None:
        uri = normalize_uri(uri)
        entry = self._load().get(uri)
        if entry is None:
            return None
        # Checked per entry: a hand-edited entry of another server must not stop this one.
        fields = ("username", "password", "token")
        if (
            not isinstance(entry, dict)
            or set(entry) - set(fields)
            or not all(isinstance(value, str) for value in entry.values())
            or not (entry.get("token") or (entry.get("username") and entry.get("password")))
        ):
            raise LocalStateInvalid(
                f"{STORE_NAME} {self.path}: the entry for {uri} is not an object with a "
                f"username and a password, or a token (strings). {FIX_ENTRY}"
            )
        return Credential.from_json(entry)

    def set(self, uri: str, credential: Credential) -> None:
        with self._writing():
            data = self._load()
            data[normalize_uri(uri)] = credential.to_json()
            self._write(data)

    def delete(self, uri: str) -> bool:
        with self._writing():
            data = self._load()
            removed = data.pop(normalize_uri(uri), None) is not None
            if removed:
                self._write(data)
            return removed

    def _write(self, data: dict[str, dict[str, str]]) -> None:
        try:
            write_private_json(self.path, data)
        except OSError as exc:
            raise self._unwritable(exc) from None

    def _unwritable(self, exc: OSError) -> LocalStateInvalid:
        return LocalStateInvalid(
            f"{STORE_NAME} {self.path} cannot be written ({exc.strerror or exc}). Make "
            "its folder writable or free space there, or choose another file with "
            "MANTIK_CREDENTIALS_FILE or c.MantikApp.credentials_path."
        )
