"""One real IPython shell for the whole session, with the mantik magics loaded."""

from __future__ import annotations

import pytest
from IPython import get_ipython
from IPython.testing.globalipapp import start_ipython

__all__ = ["ip"]


@pytest.fixture(scope="session")
def ip():
    shell = start_ipython() or get_ipython()  # one global shell per process
    shell.run_line_magic("load_ext", "mantik_jupyter")
    return shell
