"""``auth/login``, ``auth/logout``, ``auth/status``: the user's tracking credential."""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from tornado import web

from ..errors import InvalidRequest
from .base import MantikAPIHandler


class StatusHandler(MantikAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        # It may ask the tracking server whether it takes the credential.
        self.write_json(await self.in_thread(self.mantik.tracking.status))


class LoginHandler(MantikAPIHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        fields = {k: body.get(k) for k in ("username", "password", "token")}
        for key, value in fields.items():
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"'{key}' must be a string.")
        if not fields["token"] and not (fields["username"] and fields["password"]):
            raise InvalidRequest("Give 'username' and 'password', or 'token'.")
        status = await self.in_thread(self.mantik.tracking.login, **fields)
        self.write_json(status)


class LogoutHandler(MantikAPIHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        self.write_json(await self.in_thread(self.mantik.tracking.logout))


handlers = [
    (r"mantik/api/auth/status", StatusHandler),
    (r"mantik/api/auth/login", LoginHandler),
    (r"mantik/api/auth/logout", LogoutHandler),
]
