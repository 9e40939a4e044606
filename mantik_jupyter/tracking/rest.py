"""A thin client of MLflow's REST API with an explicit credential.

MLflow's Python client reads its credential from process-wide environment
variables. The lab serves one user but several tracking servers, and its child
processes (kernels, terminals) must not inherit a tracking password, so the
server side talks to MLflow through this client instead, which carries the
credential per call. Jobs and kernels use MLflow's own client.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

import requests
import urllib3

from ..errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    TrackingUnavailable,
)
from .credentials import Credential, normalize_uri
from .tls import certificate_hint, requests_verify

CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60


class TrackingClient:
    def __init__(
        self,
        uri: str,
        credential: Credential | None,
        unreachable_hint: str | None = None,
        on_unanswered: Callable[[], None] | None = None,
    ) -> None:
        """``unreachable_hint``: what to do when the server cannot be reached.
        ``on_unanswered``: called when a request times out or finds no connection."""
        self.uri = normalize_uri(uri)
        self.credential = credential
        self.on_unanswered = on_unanswered
        self.unreachable_hint = unreachable_hint or (
            "Check that it runs and that the URI is right."
        )
        self.session = requests.Session()
        # The credential travels in our own header; never read a ~/.netrc.
        self.session.trust_env = False

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self.credential.auth_header()} if self.credential else {}

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        data: BinaryIO | bytes | None = None,
        stream: bool = False,
        timeout: float = READ_TIMEOUT,
    ) -> requests.Response:
        url = f"{self.uri}/{path.lstrip('/')}"
        try:
            resp = self.session.request(
                method,
                url,
                json=json,
                params=params,
                data=data,
                headers=self._headers(),
                stream=stream,
                timeout=(min(CONNECT_TIMEOUT, timeout), timeout),
                # A CA setting matters (and is checked) only for HTTPS servers.
                verify=requests_verify() if url.lower().startswith("https:") else True,
            )
        except requests.exceptions.SSLError as exc:
            raise TrackingUnavailable(certificate_hint(self.uri, exc)) from None
        except requests.ConnectionError as exc:
            self._unanswered()
            unanswered = _unanswered_call(exc)
            if unanswered is not None:
                call = f"{method} /{path}"
                raise TrackingUnavailable(
                    f"The tracking server {self.uri} {unanswered.format(call=call)}"
                ) from None
            raise TrackingUnavailable(
                f"The tracking server {self.uri} cannot be reached ({type(exc).__name__}). "
                + self.unreachable_hint
            ) from None
        except requests.Timeout:
            self._unanswered()
            raise TrackingUnavailable(
                f"The tracking server {self.uri} did not answer within {timeout:.0f} s."
            ) from None
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError):
            # The answer began and stopped short: a reset, a proxy in front that gave up.
            raise TrackingUnavailable(
                f"The tracking server {self.uri} broke off its answer to {method} /{path}. "
                "Try again; if it keeps happening, check the server (or the proxy in front "
                "of it) for errors."
            ) from None
        self._raise_for_status(resp)
        return resp

    def _unanswered(self) -> None:
        if self.on_unanswered is not None:
            self.on_unanswered()

    def _raise_for_status(self, resp: requests.Response) -> None:
        if resp.status_code < 400:
            return
        detail = _error_detail(resp)
        who = self.credential.describe()["username"] if self.credential else None
        if resp.status_code == 401:
            raise self._refused("" if self.credential else " (none given)")
        if resp.status_code == 403:
            raise PermissionDenied(
                f"The tracking server {self.uri} denied this to user '{who}': {detail}"
            )
        if resp.status_code == 404 or "RESOURCE_DOES_NOT_EXIST" in detail:
            raise NotFound(f"Not found on the tracking server {self.uri}: {detail}")
        if resp.status_code < 500:
            raise InvalidRequest(f"The tracking server {self.uri} rejected the request: {detail}")
        raise TrackingUnavailable(
            f"The tracking server {self.uri} failed with HTTP {resp.status_code}: {detail}"
        )

    def api(
        self, method: str, endpoint: str, *, timeout: float = READ_TIMEOUT, **body: Any
    ) -> dict[str, Any]:
        """Call ``/api/2.0/mlflow/<endpoint>``; GET sends ``body`` as query parameters."""
        path = f"api/2.0/mlflow/{endpoint}"
        if method == "GET":
            resp = self.request("GET", path, params=body or None, timeout=timeout)
        else:
            resp = self.request(method, path, json=body, timeout=timeout)
        if not resp.content:
            return {}
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise TrackingUnavailable(self._not_mlflow(resp))
        return data

    def _not_mlflow(self, resp: requests.Response) -> str:
        # E.g. a single sign-on in front of MLflow: a redirect to its login page, HTTP 200.
        where = ""
        if resp.history:
            final = urlsplit(resp.url)
            where = f" after a redirect to {final.scheme}://{final.netloc}{final.path}"
        kind = resp.headers.get("Content-Type", "no content type").split(";")[0]
        return (
            f"The tracking server {self.uri} answered with {kind}{where}, not MLflow's JSON. "
            "Check that the URI points at the MLflow server itself (with its path prefix), "
            "not at a login page or a web site in front of it."
        )

    # --- checks -------------------------------------------------------------

    def health(self, timeout: float = 5) -> bool:
        try:
            resp = self.session.get(f"{self.uri}/health", timeout=(2, timeout))
        except requests.RequestException:
            return False
        return resp.status_code == 200

    def verify(self, timeout: float = READ_TIMEOUT) -> None:
        """Raise AuthenticationFailed/TrackingUnavailable unless the credential works."""
        try:
            self.api("POST", "experiments/search", timeout=timeout, max_results=1)
        except PermissionDenied:
            # Searching is open to every user; a 403 here (e.g. from a proxy in front of
            # MLflow) means the credential itself was refused.
            raise self._refused() from None
        except TrackingUnavailable as exc:
            # MLflow's basic-auth app fails with a 500 on a bearer token it cannot read;
            # the server itself answered, so the token is what it refused.
            if self.credential and self.credential.token and "HTTP 500" in exc.message:
                raise self._refused(
                    " (it answered HTTP 500 to a token: it may accept only a user name and"
                    " password)"
                ) from None
            raise

    def _refused(self, detail: str = "") -> AuthenticationFailed:
        who = self.credential.describe()["username"] if self.credential else None
        return AuthenticationFailed(
            f"The tracking server {self.uri} refused the credential"
            + (f" of user '{who}'" if who and who != "token" else "")
            + detail
            + ". Log in again with the right user name and password or token."
        )

    # --- artifacts (proxied through the server: mlflow-artifacts:/) ----------

    def upload_artifact(self, run_artifact_path: str, data: BinaryIO | bytes) -> None:
        self.request(
            "PUT",
            f"api/2.0/mlflow-artifacts/artifacts/{quote(run_artifact_path)}",
            data=data,
            timeout=3600,
        )

    def download_artifact(self, run_artifact_path: str) -> Iterator[bytes]:
        resp = self.request(
            "GET",
            f"api/2.0/mlflow-artifacts/artifacts/{quote(run_artifact_path)}",
            stream=True,
            timeout=3600,
        )
        yield from resp.iter_content(chunk_size=1 << 20)


def _error_detail(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        text = resp.text.strip()
        if "html" in resp.headers.get("Content-Type", "") or text.startswith("<"):
            # Another web server at that address (a wrong port, the lab's own URL): the
            # first line of its page ('<!DOCTYPE HTML>') said nothing.
            title = re.search(r"<title[^>]*>([^<]{1,200})</title>", text, re.IGNORECASE)
            named = f" titled {' '.join(title.group(1).split())!r}" if title else ""
            return (
                f"a web page{named}, not an answer of MLflow's API. Check that the "
                "address is the MLflow server's (host, port, path)"
            )
        lines = text.splitlines()
        detail = lines[0][:300] if lines else ""
    else:
        if isinstance(body, dict) and ("error_code" in body or "message" in body):
            code = body.get("error_code", "")
            msg = body.get("message", "")
            detail = f"{code}: {msg}" if code else str(msg)
        else:
            detail = str(body)[:300]
    # A server that is not MLflow (or a proxy in front of it) may say nothing useful.
    return detail or f"HTTP {resp.status_code} {resp.reason or ''}".strip()


def _unanswered_call(exc: requests.ConnectionError) -> str | None:
    """What went wrong, when the server was reached but gave no answer to read: it closed
    the connection after the call went out, or sent something that is not HTTP."""
    cause = exc.args[0] if exc.args else None
    if not isinstance(cause, urllib3.exceptions.ProtocolError):
        return None  # refused, no such host, no route: not reached at all
    inner = cause.args[1] if len(cause.args) > 1 else None
    if isinstance(inner, http.client.BadStatusLine) and not isinstance(
        inner, http.client.RemoteDisconnected
    ):
        return (
            "answered with something that is not HTTP to {call}. Check that this address is "
            "an MLflow server's, and that an https:// server is not addressed as http://."
        )
    return (
        "closed the connection without answering {call}: it may have stopped or crashed "
        "while handling it, so a call that changes data may or may not have taken effect. "
        "Try again; if it keeps happening, check the tracking server's log."
    )
