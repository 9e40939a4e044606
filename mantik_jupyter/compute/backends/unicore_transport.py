"""pyunicore's ``Transport`` with three additions the UNICORE backend relies on.

It keeps the HTTP status and UNICORE's own ``errorMessage`` of a failed call (pyunicore
folds them into the text of an ``httpx.HTTPError``), all calls share one ``httpx.Client``
(kept-alive connections) instead of a new connection per call, and all calls of a login
share one security session.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx
from pyunicore import client as uc


class UnicoreHTTPError(httpx.HTTPError):
    """A UNICORE answer with an error status; ``message`` is UNICORE's ``errorMessage``."""

    def __init__(self, status: int, message: str, url: str, location: str = "") -> None:
        super().__init__(f"{status} {message} for url: {url}")
        self.status = status
        self.message = message
        # Where a redirect pointed (UNICORE's REST API never redirects: a web server did).
        self.location = location


class SessionTransport(uc.Transport):
    """pyunicore's Transport, keeping the status code and UNICORE's own error message, and
    sending every call through one ``httpx.Client``: pyunicore's ``httpx.get`` & co. open
    a connection, and build an SSL context from the whole CA bundle (some 25 ms of CPU),
    for every call, and the states and logs of runs are asked for all along.

    One security session for all calls of a login, file reads included: every call that
    sends the credential makes a new session at the site, which keeps five a user and
    drops the least recently used (SecuritySessionStore). pyunicore's clones (one per
    Job, Storage, file) each kept their own session id, and file reads sent none, so
    following a log logged in anew at every read and pushed the other calls' session
    out. The clones of a login share one session id here."""

    def __init__(
        self,
        credential: Any,
        http: httpx.Client,
        *,
        use_security_sessions: bool = True,
        session: dict[str, str | None] | None = None,
    ) -> None:
        self._session: dict[str, str | None] = {"id": None}
        super().__init__(credential, use_security_sessions=use_security_sessions)
        if session is not None:
            self._session = session  # after pyunicore's __init__, which clears the id
        self.http = http

    @property
    def last_session_id(self) -> str | None:
        return self._session["id"]

    @last_session_id.setter
    def last_session_id(self, value: str | None) -> None:
        self._session["id"] = value

    def _clone(self) -> SessionTransport:
        clone = SessionTransport(
            self.credential,
            self.http,
            use_security_sessions=self.use_security_sessions,
            session=self._session,
        )
        clone._preferences = self._preferences
        clone.timeout = self.timeout
        return clone

    def run_method(self, method: Callable[..., httpx.Response], **args: Any) -> httpx.Response:
        # pyunicore's run_method, with the client's get/put/post/delete for httpx's.
        headers = self._headers(args)
        send = getattr(self.http, method.__name__)
        res = send(headers=headers, timeout=self.timeout, **args)
        if self.repeat_required(res, headers):
            res = send(headers=headers, timeout=self.timeout, **args)
        self.check_error(res)
        if self.use_security_sessions:
            self.last_session_id = res.headers.get("X-UNICORE-SecuritySession", None)
        self.settings_changed = False
        return res

    @contextmanager
    def get_stream(self, **kwargs: Any) -> Iterator[httpx.Response]:
        # With the session (pyunicore sends none here); a GET not yet read can be sent
        # again when the site answers 432 (session gone), as run_method does.
        headers = self._headers(kwargs)

        def send() -> httpx.Response:
            request = self.http.build_request(
                "GET", headers=headers, timeout=self.timeout, **kwargs
            )
            return self.http.send(request, stream=True)

        res = send()
        try:
            if self.repeat_required(res, headers):
                res.close()
                res = send()
            if self.use_security_sessions and res.status_code < 400:
                self.last_session_id = res.headers.get("X-UNICORE-SecuritySession")
            yield res
        finally:
            res.close()

    def check_error(self, res: httpx.Response) -> None:
        if 400 <= res.status_code < 600:
            res.read()
            message = res.reason_phrase
            try:
                message = res.json().get("errorMessage") or message
            except ValueError:
                pass
            raise UnicoreHTTPError(res.status_code, str(message), str(res.url))
        if res.is_redirect:
            # Not followed (a credential is not sent on to another address): a URL that
            # redirects is not the site's REST API, and the backend says where it points.
            location = res.headers.get("Location", "")
            raise UnicoreHTTPError(res.status_code, res.reason_phrase, str(res.url), location)
        res.raise_for_status()


def http_client(verify: bool | str, connections: int) -> httpx.Client:
    # Connections live 15 s between calls, below the 30 s idle timeout of UNICORE's
    # Jetty. No cookie jar: pyunicore keeps none, and UNICORE's sessions are a header.
    return httpx.Client(
        verify=verify,
        cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
        limits=httpx.Limits(max_keepalive_connections=connections, keepalive_expiry=15.0),
    )


def untrusted_certificate(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
