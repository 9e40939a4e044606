"""Which tracking server to use, with which credential: the core API of the auth faces."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from ..errors import (
    AuthenticationFailed,
    InvalidRequest,
    MantikError,
    NotLoggedIn,
    TrackingUnavailable,
)
from .credentials import (
    Credential,
    CredentialStore,
    credential_from_env,
    normalize_uri,
    split_credential,
)
from .embedded import (
    LOG_FILE,
    EmbeddedTrackingServer,
    discover,
    elsewhere_message,
    report_unanswered,
    running_host,
)
from .rest import TrackingClient

# Where the credential in use comes from, as ``status()["credential_source"]`` says.
SOURCES = {
    "login": "a stored login",
    "environment": "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN",
    "uri": "the user:password@ in the tracking URI",
    "embedded": "the embedded server's automatic login",
}

# How long the answer to "does the server take this credential" is trusted by ``status``.
CHECKED_FOR = 60.0
# A status must answer quickly, also while a remote server does not: unknown, not refused.
CHECK_TIMEOUT = 5.0


def logout_message(status: dict[str, Any]) -> str:
    """What a logout did, for people: a logout can leave another credential in use."""
    uri = status["tracking_uri"]
    done = f"Logged out of {uri}." if status.get("removed") else f"No stored login for {uri}."
    if not status["logged_in"]:
        return f"{done} {status['message']}" if status.get("message") else done
    source = status.get("credential_source")
    how = SOURCES.get(source or "", "another credential")
    hint = {
        "environment": " (unset them to log out)",
        "uri": " (take it out of the URI to log out)",
    }.get(source or "", "")
    return f"{done} Still logged in as {status['username']} through {how}{hint}."


class TrackingService:
    """The tracking server of this lab (embedded or remote) and the user's credential for it.

    Credentials are looked up in this order: a login stored for the URI, the
    ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN`` environment, a
    ``user:password@`` written into the URI (removed from the URI itself), and, for the
    embedded server, its generated admin credential (the automatic login).
    """

    def __init__(
        self,
        store: CredentialStore,
        tracking_uri: str | None = None,
        embedded: EmbeddedTrackingServer | None = None,
        embedded_credential: Credential | None = None,
        embedded_dir: Path | None = None,
    ) -> None:
        """``embedded_dir``: the data dir of the embedded server at ``tracking_uri`` (the
        CLI and kernels find it there); logins to it are stored under that dir."""
        if tracking_uri is None and embedded is None:
            raise ValueError("give a tracking URI or an embedded server")
        self.store = store
        self._uri_credential: Credential | None = None
        if tracking_uri:
            tracking_uri, self._uri_credential = split_credential(tracking_uri)
        self._uri = normalize_uri(tracking_uri) if tracking_uri else None
        self.embedded_server = embedded
        self._embedded_credential = embedded_credential
        self._embedded_dir = embedded.directory if embedded is not None else embedded_dir
        # (fingerprint of URI and credential, when checked, the server's refusal or None)
        self._checked: tuple[str, float, str | None] | None = None
        self._check_lock = threading.Lock()

    @property
    def is_embedded(self) -> bool:
        return self._embedded_credential is not None or self.embedded_server is not None

    @property
    def embedded_credential(self) -> Credential | None:
        """The embedded server's admin credential (makes per-run users); None when remote."""
        if self._embedded_credential is None and self.embedded_server is not None:
            # Asked for each time: a broken secrets file is reported on every call.
            return self.embedded_server.credential()
        return self._embedded_credential

    @property
    def uri(self) -> str:
        if self.embedded_server is not None:
            return self.embedded_server.uri
        assert self._uri is not None
        return self._uri

    @property
    def store_key(self) -> str:
        """The credential store's key for this server: its URI, except for an embedded
        server, whose port changes with every start of the lab (a login to it would be
        lost at the next start and left under a port some later server may get)."""
        if self._embedded_dir is not None:
            return embedded_store_key(self._embedded_dir)
        return self.uri

    @property
    def ready(self) -> bool:
        return self.embedded_server is None or self.embedded_server.ready

    def wait_ready(self, timeout: float | None = None) -> None:
        if self.embedded_server is not None:
            self.embedded_server.wait_ready(timeout)

    def credential(self) -> Credential | None:
        return self._credential_and_source()[0]

    def _credential_and_source(self) -> tuple[Credential | None, str | None]:
        """The credential in use and where it comes from (see ``SOURCES``)."""
        stored = self.store.get(self.store_key)
        if stored:
            return stored, "login"
        env = credential_from_env()
        if env and not self.is_embedded:
            return env, "environment"
        if self._uri_credential:
            return self._uri_credential, "uri"
        embedded = self.embedded_credential
        return embedded, "embedded" if embedded else None

    def require_credential(self) -> Credential:
        cred = self.credential()
        if cred is None:
            raise NotLoggedIn(
                f"Not logged in to the tracking server {self.uri}. Log in from the Mantik "
                "panel, with %mantik_login, or with `mantik login`."
            )
        return cred

    def client(self) -> TrackingClient:
        self.wait_ready()
        return TrackingClient(
            self.uri,
            self.require_credential(),
            self._unreachable_hint(),
            on_unanswered=self.report_unanswered,
        )

    def report_unanswered(self) -> None:
        """A request to the tracking server timed out or found no connection: for an
        embedded server, the lab that runs it checks it and restarts it if it hangs."""
        if self._embedded_dir is not None:
            report_unanswered(self._embedded_dir)

    def _unreachable_hint(self) -> str | None:
        if self._embedded_dir is None:
            return None
        # Not "check the URI": nobody typed it. The lab notices a stopped server within
        # seconds and starts it again.
        return (
            "It is the embedded server of a lab (data dir "
            f"{self._embedded_dir.parent}); the lab starts it again when it stops: try "
            "again in a few seconds, and start JupyterLab if it is not running. See "
            f"{self._embedded_dir / LOG_FILE}."
        )

    def status(self) -> dict[str, Any]:
        """Who the user is logged in as. A credential the server refuses is no login: one
        from the environment or the URI was never checked, a stored one may have been
        revoked since. Asks the server at most every ``CHECKED_FOR`` seconds (blocking)."""
        cred, source = self._credential_and_source()
        refusal = self._refusal(cred) if cred is not None and source != "embedded" else None
        status = {
            "tracking_uri": self.uri,
            "username": cred.describe()["username"] if cred else None,
            "logged_in": cred is not None and refusal is None,
            "credential_source": source,
            "embedded": self.is_embedded,
            "ready": self.ready,
        }
        if refusal is not None:
            status["message"] = f"{refusal} (The credential came from {SOURCES[source or '']}.)"
        return status

    def _fingerprint(self, cred: Credential) -> str:
        # Kept in memory only, and no secret even there: a digest.
        return hashlib.sha256(f"{self.uri}\0{cred.auth_header()}".encode()).hexdigest()

    def _refusal(self, cred: Credential) -> str | None:
        """The server's refusal of ``cred``, or None when it takes it (or cannot say)."""
        key = self._fingerprint(cred)
        with self._check_lock:
            checked = self._checked
            if checked and checked[0] == key and time.monotonic() - checked[1] < CHECKED_FOR:
                return checked[2]
            refusal: str | None = None
            try:
                TrackingClient(self.uri, cred).verify(timeout=CHECK_TIMEOUT)
            except AuthenticationFailed as exc:
                refusal = exc.message
            except MantikError:
                return None  # unreachable or answering oddly: the calls themselves will say
            self._checked = (key, time.monotonic(), refusal)
            return refusal

    def login(
        self,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
    ) -> dict[str, Any]:
        """Verify a credential against the tracking server, then store it (0600)."""
        if token and (username or password):
            # Which would win differs between clients (MLflow's takes the password,
            # a bearer header the token): one login is one of the two.
            raise InvalidRequest("Give a username and password, or a token, not both.")
        cred = Credential(username=username, password=password, token=token)
        self.wait_ready()
        TrackingClient(self.uri, cred).verify()
        self.store.set(self.store_key, cred)
        self._checked = (self._fingerprint(cred), time.monotonic(), None)
        return self.status()

    def logout(self) -> dict[str, Any]:
        """Forget the stored login. A credential from elsewhere (see ``SOURCES``) stays in
        use: the status says which, and ``logout_message`` tells the user."""
        removed = self.store.delete(self.store_key)
        return {**self.status(), "removed": removed}


def resolve_tracking(
    store_path: Path,
    embedded_dir: Path,
    tracking_uri: str | None = None,
) -> TrackingService:
    """The tracking service for a process outside the lab server (CLI, kernel).

    An explicit URI, ``MLFLOW_TRACKING_URI`` or the lab's ``MANTIK_TRACKING_URI``
    wins; otherwise the embedded
    server that a running lab started is used.
    """
    store = CredentialStore(store_path)
    for uri, source in (
        (tracking_uri, "given with --tracking-uri"),
        (os.environ.get("MLFLOW_TRACKING_URI"), "from $MLFLOW_TRACKING_URI"),
        (os.environ.get("MANTIK_TRACKING_URI"), "from $MANTIK_TRACKING_URI"),
    ):
        if uri:
            check_http_uri(uri, source)
            return TrackingService(store, tracking_uri=uri)
    found = discover(embedded_dir)
    if found is None:
        host = running_host(embedded_dir.resolve()) if embedded_dir.is_dir() else None
        if host is not None:
            raise TrackingUnavailable(elsewhere_message(embedded_dir.resolve(), host))
        # Where it looked: a lab started with another MANTIK_DATA_DIR runs its server
        # elsewhere; `mantik` and %mantik_login take an address as well.
        raise TrackingUnavailable(
            "No tracking server is configured and no embedded one is running (looked in "
            f"{embedded_dir}). Start JupyterLab (it starts the embedded server) with the "
            "same MANTIK_DATA_DIR, or set MLFLOW_TRACKING_URI (or give --tracking-uri)."
        )
    uri, admin = found
    return TrackingService(
        store, tracking_uri=uri, embedded_credential=admin, embedded_dir=embedded_dir.resolve()
    )


def check_http_uri(
    uri: str,
    source: str,
    name: str = "tracking URI",
    unset: str = "to use the lab's embedded server",
) -> None:
    """A tracking URI that is no http(s) address ('localhost:5000', an MLflow file store)
    failed deep inside the HTTP client with a traceback, or was told to log in first.
    ``source`` says where the value came from; ``unset``, what leaving it out does."""
    try:
        shown, _ = split_credential(uri)  # a password in the URI is never shown
        parts = urlsplit(uri)
        # 'https://ada:p#ss@host': an unencoded '#', '/' or '?' in a password ends the
        # host part early, leaving the rest of the password to be shown as path or fragment.
        # An '@' after the host part is such a password's end ('ada:2024/pw@host' parses,
        # with 'ada' for its host, and no tracking server's address holds one).
        ok = (
            parts.scheme in ("http", "https")
            and bool(parts.hostname)
            and uri.count("@") == parts.netloc.count("@")
        )
        parts.port  # noqa: B018 - raises for 'p', the start of that password
    except ValueError:  # unparsable ('http://[::1', a port that is no number)
        shown, ok = uri, False
    if not ok:
        # Without '//' no netloc is parsed: 'admin:pw@localhost:5000' keeps its password.
        shown = re.sub(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://)?[^/?#]*@", "", shown)
        # Nor with one slash ('https:/admin:pw@host'), nor when the password ended early:
        # everything up to the last '@' goes.
        shown = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*:/*).*@", r"\1", shown)
        userinfo = (
            " A user name and password written into it must have '#', '/', '?' and '@' "
            "percent-encoded (%23, %2F, %3F, %40); better, leave them out and log in."
            if "@" in uri
            else ""
        )
        raise InvalidRequest(
            f"The {name} {shown!r} ({source}) is not the http:// or https:// address of "
            "an MLflow tracking server. Write it like http://localhost:5000 or "
            f"https://mlflow.example.org, or leave it unset {unset}.{userinfo}"
        )


def run_page_url(
    experiment_id: str, run_id: str, tracking_uri: str, lab_base_url: str | None = None
) -> str:
    """The link a user can open to a run's page in the MLflow UI; every face shows this one.

    In a lab (``lab_base_url``: the lab's base URL as its browser sees it, ``/`` or
    ``/user/ada/``), the lab's MLflow proxy: the browser opens it with the user's Jupyter
    login, and the proxy adds the tracking credential (the embedded server listens on the
    lab's loopback, with a password the user never sees). Outside a lab (the CLI, a
    terminal, a kernel of no lab) only the tracking server's own UI opens."""
    fragment = f"#/experiments/{quote(experiment_id, safe='')}/runs/{quote(run_id, safe='')}"
    if lab_base_url is not None:
        return f"{lab_base_url.rstrip('/')}/mantik/mlflow/{fragment}"
    bare, _ = split_credential(tracking_uri)  # a password in the URI is never shown
    return f"{bare.rstrip('/')}/{fragment}"


def embedded_store_key(directory: Path) -> str:
    return f"embedded:{directory}"
