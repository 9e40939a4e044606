"""TEST INFRASTRUCTURE: a stand-in for a UNICORE site, for tests only.

No UNICORE server can be installed on the test machines, so the UNICORE backend is
tested against this loopback HTTP server. It follows the UNICORE REST API as pyunicore
uses it (see ``server.py``) and really runs each job's script as a local process.
It is not a UNICORE implementation and must never be used outside the tests.
"""

from .server import StandinJob, UnicoreStandin

__all__ = ["StandinJob", "UnicoreStandin"]
