"""The ``%mantik_*`` magics: a thin face of the core for notebooks and IPython."""

from __future__ import annotations

import getpass
from typing import Any

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool

from ..api import tracking_service
from ..errors import MantikError


@magics_class
class MantikMagics(Magics):
    show_tracebacks = Bool(
        False, config=True, help="Show full tracebacks of mantik errors (for debugging)."
    ).tag(config=True)

    def _fail(self, err: MantikError) -> None:
        if self.show_tracebacks:
            raise err
        # One readable line: what went wrong and what to do.
        print(f"mantik: {err.message}")

    @magic_arguments()
    @argument("--username", "-u", help="User name on the tracking server.")
    @argument("--token", action="store_true", help="Log in with a token instead of a password.")
    @argument("--tracking-uri", help="The tracking server (default: the lab's).")
    @line_magic
    def mantik_login(self, line: str) -> dict[str, Any] | None:
        """Log in to the tracking server. The password or token is asked for, never echoed."""
        args = parse_argstring(self.mantik_login, line)
        try:
            service = tracking_service(args.tracking_uri)
            if args.token:
                status = service.login(token=getpass.getpass("Token: "))
            else:
                username = args.username or input("Username: ")
                status = service.login(username=username, password=getpass.getpass("Password: "))
        except MantikError as err:
            self._fail(err)
            return None
        print(f"Logged in to {status['tracking_uri']} as {status['username']}.")
        return status


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(MantikMagics)
