"""What the sidebar (labextension/src) knows of the core's names stays the core's."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType

from mantik_jupyter.compute import layout
from mantik_jupyter.compute.backends import local

LABEXTENSION = Path(__file__).resolve().parents[1] / "labextension"
STATE_TS = LABEXTENSION / "src" / "state.ts"
PARAM_NAMES = LABEXTENSION / "test" / "param-names.json"


def _run_dir_names(module: ModuleType) -> set[str]:
    """The file names a module's constants give to files in a run directory."""
    return {
        value
        for key, value in vars(module).items()
        if key.isupper()
        and isinstance(value, str)
        and re.fullmatch(r"\.?[\w.-]+", value)
        and ("mantik" in value or value.endswith((".sh", ".tar.gz")))
    }


def test_the_files_view_sets_apart_every_file_mantik_writes_to_run_a_job() -> None:
    """The files view lists the user's files first and mantik's apart, by name: a file the
    core or a backend starts writing into a run directory must be named there too."""
    block = re.search(r"export const MANTIK_FILES[^{]*\{(.*?)\n\};", STATE_TS.read_text(), re.S)
    assert block, f"no MANTIK_FILES in {STATE_TS}"
    listed = set(re.findall(r"^\s*'([^']+)':", block.group(1), re.M))
    # The job's output and the output of the config's login node commands are the user's.
    users = {layout.LOG_FILE, layout.LOGIN_LOG_FILE}
    written = (_run_dir_names(layout) | _run_dir_names(local)) - users
    assert listed == written, (
        f"MANTIK_FILES in {STATE_TS} lists {sorted(listed - written)} that no one writes and "
        f"misses {sorted(written - listed)}"
    )


def test_the_submit_dialogs_table_of_parameter_names_is_mlflows() -> None:
    """The submit dialog says at the field when MLflow will refuse a parameter's name; its
    check is tested (vitest) against a table of names, which MLflow's own validation (of
    the version installed) must agree with."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_param

    def accepted(name: str) -> bool:
        try:
            _validate_param(name, "1")
        except MlflowException:
            return False
        return True

    names = json.loads(PARAM_NAMES.read_text(encoding="utf-8"))["names"]
    assert len(names) > 20
    wrong = [(name, expected) for name, expected in names if accepted(name) != expected]
    assert not wrong, f"{PARAM_NAMES}: MLflow decides otherwise on {wrong}"
