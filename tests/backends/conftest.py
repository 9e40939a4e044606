"""Makes the cluster fixtures available to these tests until tests/conftest.py imports them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_fixtures import *  # noqa: E402,F403
