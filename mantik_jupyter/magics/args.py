"""A magic's line split into arguments as a shell splits it.

IPython's ``parse_argstring`` splits without removing quotes, so
``--run-name "my run"`` named the run ``"my run"`` with its quotes and
``-P "station=Bad Homburg"`` could not be given at all.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError

from ..errors import InvalidRequest


def parse_line(magic: Callable[..., Any], line: str) -> argparse.Namespace:
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise InvalidRequest(
            f"Cannot split the arguments {line.strip()!r}: {exc}. Close the quote, or escape "
            "a lone one with a backslash."
        ) from None
    try:
        return magic.parser.parse_args(argv)  # type: ignore[attr-defined]
    except UsageError as err:
        if "unrecognized arguments" not in str(err):
            raise
        # `%mantik_logs lr 0.05` for the run named "lr 0.05": IPython's message named
        # only the word left over.
        raise UsageError(
            f"{err} (a run name or a value with spaces needs quotes, as in a shell: "
            '"lr 0.05")'
        ) from None

