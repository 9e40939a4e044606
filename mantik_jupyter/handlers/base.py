"""The base of every mantik handler: authentication, JSON in and out, and error mapping.

Domain errors (``mantik_jupyter.errors``) become ``{"message", "reason"}`` with
their own status. Anything else is a 500 whose body says only that the server
log has the details: no traceback ever reaches a response.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from jupyter_server.utils import ensure_async
from tornado import web

from .. import json_out
from ..errors import InvalidRequest, MantikError

if TYPE_CHECKING:
    from ..app import MantikApp

T = TypeVar("T")

AUTH_RESOURCE = "mantik"
# Largest JSON request body (bytes) the API reads.
MAX_JSON_BODY = 1024 * 1024


def _not_json(constant: str) -> Any:
    """Python's json reads NaN and Infinity, which are not JSON; refuse them."""
    raise ValueError(f"{constant} is not a JSON value")


def write_mantik_error(handler: web.RequestHandler, status_code: int, **kwargs: Any) -> None:
    """``write_error`` shared by the JSON handlers and the proxy."""
    exc = kwargs.get("exc_info", (None, None, None))[1]
    if isinstance(exc, MantikError):
        handler.set_status(exc.status)
        body = exc.to_json()
    elif isinstance(exc, web.HTTPError):
        body = {
            "message": exc.log_message or exc.reason or handler._reason,
            "reason": (exc.reason or handler._reason).lower().replace(" ", "_"),
        }
    else:
        body = {
            "message": "Internal error in the mantik server extension; the server log has details.",
            "reason": "internal_error",
        }
    handler.clear_header("Content-Disposition")
    handler.set_header("Content-Type", "application/json")
    handler.finish(json.dumps(body))


class MantikErrors:
    """How every mantik handler reports a failure: domain errors as they are, anything
    else without a traceback."""

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, MantikError):
            # A user-facing error: its message is the whole story, and carries no secret.
            self.log.warning("%s %s: %s", self.request.method, self.request.path, value.message)  # type: ignore[attr-defined]
        else:
            super().log_exception(typ, value, tb)  # type: ignore[misc]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        write_mantik_error(self, status_code, **kwargs)  # type: ignore[arg-type]

    async def in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking core call off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))


class MantikMixin(MantikErrors, ExtensionHandlerMixin):
    """What the JSON handlers and the proxy's Jupyter route share."""

    auth_resource = AUTH_RESOURCE

    @property
    def mantik(self) -> MantikApp:
        return self.extensionapp  # type: ignore[return-value]

    async def check_authorized(self) -> None:
        """Authentication and authorization, for handlers that cannot use the decorators."""
        user = self.current_user  # type: ignore[attr-defined]
        if not user:
            raise web.HTTPError(403, "Authentication is required.")
        method = self.request.method or "GET"  # type: ignore[attr-defined]
        action = {"GET": "read", "HEAD": "read", "OPTIONS": "read"}.get(method, "write")
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, user, action, self.auth_resource)  # type: ignore[attr-defined]
        )
        if not allowed:
            raise web.HTTPError(403, f"Not authorized to {action} {self.auth_resource}.")


class MantikAPIHandler(MantikMixin, APIHandler):
    """JSON handlers under ``{base_url}mantik/api/``; every verb needs an authorized user."""

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        await self.check_authorized()

    def json_body(self) -> dict[str, Any]:
        body = self.request.body
        if not body:
            return {}
        if len(body) > MAX_JSON_BODY:
            # Every request of this API is a few hundred bytes; a larger one would only be
            # stored on a run (a megabyte run name) and sent back with every list.
            raise InvalidRequest(
                f"The request body is {len(body)} bytes; this API accepts at most "
                f"{MAX_JSON_BODY} bytes of JSON."
            )
        try:
            data = json.loads(body, parse_constant=_not_json)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
        except RecursionError:
            # json's decoder recurses once per level: a deep [[[...]]] exhausts the stack.
            raise InvalidRequest(
                "The request body is not valid JSON for this API: its arrays or objects "
                "are nested too deeply."
            ) from None
        if not isinstance(data, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        return data

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json_out.dumps(data))
