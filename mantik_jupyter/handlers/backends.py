"""``backends``: which compute backends this lab can use and what each can do."""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from tornado import web

from .base import MantikAPIHandler


class BackendsHandler(MantikAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        backends = await self.in_thread(self.mantik.run_service.backends)
        self.write_json({"backends": backends})


handlers = [(r"mantik/api/backends", BackendsHandler)]
