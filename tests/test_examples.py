"""What the README, docs/ and the example project show a new user is what the product does:
every `mantik` command and flag and every magic option they name exists, every config they
show is accepted, every setting they name is one; the example config shows every key the
config module accepts, each alternative valid once uncommented; the example notebook runs
from top to bottom, as shipped, against an embedded tracking server as the demo starts it."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml

from mantik_jupyter.app import MantikApp
from mantik_jupyter.cli import build_parser
from mantik_jupyter.compute import config as config_module
from mantik_jupyter.compute.config import load_config, parse_config
from mantik_jupyter.errors import ConfigError
from mantik_jupyter.magics import MantikMagics
from mantik_jupyter.magics.dashboards import DashboardMagics
from mantik_jupyter.magics.display import Run

from .runs_helpers import EXAMPLE

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLE_CONFIG = EXAMPLE / "compute-backend-config.yaml"
EXAMPLE_NOTEBOOK = EXAMPLE / "weather-forecast.ipynb"


def doc_texts() -> list[tuple[str, str]]:
    """(name, text) of every document a user reads: README, docs/, the notebook's cells."""
    texts = [(path.relative_to(REPO).as_posix(), path.read_text()) for path in DOCS]
    notebook = nbformat.read(EXAMPLE_NOTEBOOK, as_version=4)
    texts += [
        (
            f"{EXAMPLE_NOTEBOOK.name}[{c.id}]",
            c.source if c.cell_type == "markdown" else f"```python\n{c.source}\n```\n",
        )
        for c in notebook.cells
    ]
    return texts


def snippets(text: str) -> list[str]:
    """Inline code spans and the lines of fenced code blocks."""
    fence = r"^ *```[a-z]*\n(.*?)^ *```"
    blocks = re.findall(fence, text, flags=re.S | re.M)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    outside = re.sub(fence, "", text, flags=re.S | re.M)
    return lines + re.findall(r"`([^`\n]+)`", outside)


def commands(prefix: str) -> list[tuple[str, str]]:
    """(document, command) for every command line starting with ``prefix`` in the docs."""
    found = []
    for name, text in doc_texts():
        for snippet in snippets(text):
            for part in snippet.split(";"):
                # A shell comment, or a Python one after a magic.
                part = re.sub(r"\s#.*$", "", part).strip()
                part = re.sub(r"^\w+ = ", "", part)  # run = %mantik_submit ...
                if part.startswith(prefix):
                    found.append((name, part))
    return found


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def words(command: str) -> list[str]:
    # Placeholders such as <id prefix or run name> are one word to the reader.
    command = re.sub(r"<[^>]*>", "ARG", command)
    return shlex.split(command.replace("{", "").replace("}", ""))


def test_every_mantik_command_and_flag_in_the_docs_exists() -> None:
    found = commands("mantik ")
    assert len(found) >= 8, found  # the scan itself still finds the README's commands
    problems = []
    for name, command in found:
        parser = build_parser()
        for word in words(command)[1:]:
            if word.startswith("-"):
                flag = word.split("=", 1)[0]
                if flag not in options_of(parser):
                    problems.append(f"{name}: `{command}`: no option {flag}")
                continue
            children = subcommands(parser)
            if children:
                if word not in children:
                    problems.append(f"{name}: `{command}`: no command {word!r}")
                    break
                parser = children[word]
    assert not problems, "\n".join(problems)


def test_every_magic_and_option_in_the_docs_exists() -> None:
    magics = {**MantikMagics.magics["line"], **DashboardMagics.magics["line"]}
    owners = {name: MantikMagics for name in MantikMagics.magics["line"]}
    owners.update({name: DashboardMagics for name in DashboardMagics.magics["line"]})
    problems = []
    named = set()
    for name, text in doc_texts():
        for magic in re.findall(r"%(mantik_\w+)", text):
            named.add(magic)
            if magic not in magics:
                problems.append(f"{name}: no magic %{magic}")
    found = commands("%mantik_")
    assert len(found) >= 8, found
    for name, command in found:
        magic, *rest = words(command.rstrip("?"))
        magic = magic.lstrip("%")
        if magic not in magics:
            continue  # reported above
        parser = getattr(owners[magic], magic).parser
        for word in rest:
            if word.startswith("-") and word.split("=", 1)[0] not in options_of(parser):
                problems.append(f"{name}: `{command}`: %{magic} has no option {word}")
    assert not problems, "\n".join(problems)
    # A magic nobody is told about is a magic nobody uses.
    assert set(magics) <= named, set(magics) - named


def test_every_run_attribute_in_the_docs_is_used_as_it_is() -> None:
    """`run.params()` in the README was a TypeError: params is a property, metrics() a method."""
    problems = []
    uses = 0
    for name, text in doc_texts():
        for snippet in snippets(text):
            for attribute, call in re.findall(r"\b(?:run|second|sleeper)\.(\w+)(\()?", snippet):
                uses += 1
                member = vars(Run).get(attribute)
                if member is None:
                    problems.append(f"{name}: `{snippet}`: a Run has no {attribute!r}")
                elif call and isinstance(member, property):
                    problems.append(f"{name}: `{snippet}`: run.{attribute} is no method")
                elif not call and not isinstance(member, property):
                    problems.append(f"{name}: `{snippet}`: run.{attribute} is a method: add ()")
    assert uses >= 10
    assert not problems, "\n".join(problems)


def test_every_lab_setting_in_the_docs_exists_and_every_setting_is_documented() -> None:
    own = {
        name
        for name, trait in MantikApp.class_traits(config=True).items()
        if name in MantikApp.__dict__
    }
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"c\.MantikApp\.(\w+)", readme))
    listed = re.search(r"Other settings.*?\n\n((?:\|[^\n]*\n)+)", readme, flags=re.S)
    assert listed, "README: the list of other settings is gone"
    named |= {row.split("`")[1] for row in listed.group(1).splitlines()[2:]}
    assert named <= own, f"README names settings MantikApp lacks: {named - own}"
    assert own <= named, f"settings the README does not mention: {own - named}"


def test_the_readme_shows_the_example_notebook_as_it_is() -> None:
    readme = (REPO / "README.md").read_text()
    shown = re.search(
        r"weather-forecast\.ipynb` and run its cells.*?```python\n(.*?)```", readme, re.S
    )
    assert shown, "README: the example notebook's cells are no longer shown"
    notebook = nbformat.read(EXAMPLE_NOTEBOOK, as_version=4)
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    for line in shown.group(1).splitlines():
        for part in re.sub(r"\s#.*$", "", line).split(";"):
            assert part.strip() in code, f"README shows `{part.strip()}`, the notebook does not"


def test_every_doc_is_named_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for path in (REPO / "docs").iterdir():
        name = path.relative_to(REPO).as_posix()
        assert name in readme, f"README does not point to {name}: nobody finds it"


def test_every_config_in_the_docs_is_accepted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MANTIK_COMPUTE_BUDGET_ACCOUNT", raising=False)
    checked = 0
    for name, text in doc_texts():
        for index, block in enumerate(re.findall(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M)):
            path = tmp_path / f"{index}-compute-backend-config.yaml"
            path.write_text(block)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                try:
                    load_config(path)
                except (ConfigError, Warning) as problem:
                    pytest.fail(f"{name}, YAML block {index + 1}: {problem}")
            checked += 1
    assert checked >= 1


# ---- the example compute-backend-config.yaml --------------------------------------------------

# A commented-out key (`# Key: value`, `#   Key:`), not prose.
_COMMENTED_KEY = re.compile(r"^(\s*)# ?(\s*)([A-Za-z]\w*:(?:\s.*)?)$")


def uncommented(text: str) -> str:
    return "\n".join(
        (m.group(1) + m.group(2) + m.group(3)) if (m := _COMMENTED_KEY.match(line)) else line
        for line in text.splitlines()
    )


def test_the_example_config_as_shipped_runs_locally_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config(EXAMPLE_CONFIG)
    assert config.backend == "local" and config.warnings == ()
    # What the demo needs: nothing of this machine in it, logs that can be followed.
    assert config.local is not None and config.local.directory is None
    assert config.environment.python is None and config.environment.apptainer is None


def test_the_example_config_shows_every_key_and_each_alternative_is_valid(monkeypatch) -> None:
    monkeypatch.delenv("MANTIK_COMPUTE_BUDGET_ACCOUNT", raising=False)
    text = EXAMPLE_CONFIG.read_text()
    # Duplicate keys (`Local: {}` and the commented `Local:` with a Directory): the last wins.
    full = yaml.safe_load(uncommented(text))
    sections = {
        "": config_module._TOP_KEYS,
        "SSH": config_module._SSH_KEYS,
        "Local": config_module._LOCAL_KEYS,
        "Resources": config_module._RESOURCE_KEYS,
        "Environment": config_module._ENVIRONMENT_KEYS,
    }
    for section, keys in sections.items():
        shown = full if not section else full[section]
        missing = set(keys) - set(shown) - {"Firecrest"}  # not supported yet: not shown
        assert not missing, f"the example config does not show {section or 'top-level'} {missing}"
    assert set(full["Environment"]["Apptainer"]) == set(config_module._APPTAINER_KEYS)

    common = {key: full[key] for key in ("ComputeBudgetAccount", "Resources", "Exclude")}
    environment = dict(full["Environment"])
    # PostRunCommandOnLoginNode is refused over SSH (nothing there sees the job end).
    venv = {k: v for k, v in environment.items() if k != "Apptainer"}
    image = {k: v for k, v in environment.items() if k != "Python"}
    over_ssh = {k: v for k, v in environment.items() if k != "PostRunCommandOnLoginNode"}
    ssh_venv = {k: v for k, v in over_ssh.items() if k != "Apptainer"}
    ssh_image = {k: v for k, v in over_ssh.items() if k != "Python"}
    variants = {
        "SSH with a venv": {"SSH": full["SSH"], **common, "Environment": ssh_venv},
        "SSH with an image": {"SSH": full["SSH"], **common, "Environment": ssh_image},
        "UNICORE with a venv": {
            "UnicoreApiUrl": full["UnicoreApiUrl"],
            **common,
            "Environment": venv,
        },
        "Local with a directory": {"Local": full["Local"], **common, "Environment": image},
    }
    for name, data in variants.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            config = parse_config(data, source=f"example config, {name}")
        assert config.warnings == (), name


def documented_commands() -> dict[str, str]:
    """The login- and compute-node commands the README's and the example's configs show."""
    readme = (REPO / "README.md").read_text()
    shown: dict[str, str] = {}
    for block in re.findall(r"^```yaml\n(.*?)^```", readme, flags=re.S | re.M):
        shown.update(yaml.safe_load(block).get("Environment", {}))
    shown.update(yaml.safe_load(uncommented(EXAMPLE_CONFIG.read_text()))["Environment"])
    return {key: value for key, value in shown.items() if key.endswith("Node")}


def test_login_node_commands_find_the_project_where_the_docs_say(
    service, tmp_path, experiment_name
) -> None:
    """`PreRunCommandOnLoginNode: ./stage-data.sh` in the README failed (127): login-node
    commands run in the run directory, the project being in code/ there. Each documented
    command, its script put into the project, runs on the local backend as shown."""
    from .runs_helpers import FINAL, wait_for

    project = tmp_path / "weather-forecast"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("results", ".ipynb_*"))
    environment: dict[str, Any] = {}
    for key, value in documented_commands().items():
        commands = [value] if isinstance(value, str) else list(value)
        for script in re.findall(r"(?:^|\s)(?:\./|code/)?([\w-]+\.sh)\b", " ".join(commands)):
            (project / script).write_text(f"#!/bin/sh\necho {script} ran in $(pwd)\n")
            (project / script).chmod(0o755)
        # No GPU here: a command that is only an example of one stands in as itself.
        environment[key] = [c for c in commands if c != "nvidia-smi"]
    assert {"PreRunCommandOnLoginNode", "PreRunCommandOnComputeNode"} <= set(environment)
    environment["Python"] = sys.prefix  # the job's `python` is this venv's
    (project / "compute-backend-config.yaml").write_text(
        yaml.safe_dump({"Local": {}, "Resources": {"Queue": "local"}, "Environment": environment})
    )
    info = service.submit(project, params={"epochs": "1"}, experiment_name=experiment_name)
    final = wait_for(service, info.run_id, FINAL, timeout=60)
    run_dir = Path(final.tags["mantik.run_dir"])
    login_log = (run_dir / "mantik-login.log").read_text()
    job_log = (run_dir / "mantik.log").read_text()
    assert final.state == "FINISHED", (final.reason, login_log, job_log)
    assert "stage-data.sh ran in" in login_log, login_log


# ---- the example notebook ---------------------------------------------------------------------


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch) -> Any:
    """An embedded tracking server in a fresh mantik data dir, as the lab starts it, and a
    kernel environment with no tracking settings of its own: the demo's situation."""
    from mantik_jupyter.tracking.embedded import EmbeddedTrackingServer

    data_dir = tmp_path / "mantik"
    for name in list(os.environ):
        if name.startswith("MLFLOW_") or name in (
            "MANTIK_TRACKING_URI",
            "MANTIK_CREDENTIALS_FILE",
            "MANTIK_COMPUTE_BUDGET_ACCOUNT",
            "JPY_SESSION_NAME",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MANTIK_DATA_DIR", str(data_dir))
    # scripts/demo.sh starts the lab in the activated venv: the local job's `python` is its.
    bin_dir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join([bin_dir, os.environ.get("PATH", "")]))
    server = EmbeddedTrackingServer(data_dir / "tracking")
    server.start()
    try:
        server.wait_ready(120)
        yield server
    finally:
        server.stop()


def shown(cell: Any, mime: str = "text/plain") -> str:
    return "".join(
        str(o["data"].get(mime, ""))
        for o in cell.outputs
        if o.output_type in ("display_data", "execute_result")
    )


def printed(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_the_example_notebook_runs_as_shipped_on_the_embedded_default(
    tmp_path: Path, embedded: Any
) -> None:
    from nbclient import NotebookClient

    from mantik_jupyter.tracking.rest import TrackingClient
    from mantik_jupyter.tracking.runs_api import RunsApi

    project = tmp_path / "weather-forecast"
    # Without what a demo run in this checkout may have left there.
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("results", ".ipynb_*"))
    path = project / EXAMPLE_NOTEBOOK.name
    nb = nbformat.read(path, as_version=4)
    started = int(time.time() * 1000)
    NotebookClient(nb, timeout=180, resources={"metadata": {"path": str(project)}}).execute(
        env={
            **os.environ,
            "JPY_SESSION_NAME": str(path),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
    )
    cells = {c.id: c for c in nb.cells if c.cell_type == "code"}
    assert list(cells) == [
        "load",
        "submit",
        "follow",
        "run",
        "second",
        "runs",
        "compare",
        "download",
        "cancel",
    ]
    for cell in cells.values():
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs

    # Submitted without --wait: a live status line, no Out[] repeating it.
    assert "Run " in shown(cells["submit"]), cells["submit"].outputs
    assert not [o for o in cells["submit"].outputs if o.output_type == "execute_result"]
    assert "open in MLflow" in shown(cells["submit"], "text/html")
    follow = printed(cells["follow"]) + shown(cells["follow"])
    assert "epoch 8/8" in follow and "[mantik] exit status 0" in follow, follow
    assert printed(cells["run"]).strip() == "FINISHED"
    assert "'loss'" in shown(cells["run"]) and "'rmse'" in shown(cells["run"])
    assert "FINISHED" in shown(cells["second"]) and "rmse=" in shown(cells["second"])
    assert "mantik-runs" in shown(cells["runs"], "text/html")
    assert "FINISHED" in shown(cells["runs"])
    assert "application/vnd.jupyter.widget-view+json" in str(cells["compare"].outputs)
    assert "Comparison of 2 runs" in shown(cells["compare"])
    assert "station,day_ahead,temperature_degC" in printed(cells["download"])
    (forecast,) = (project / "results").glob("*/forecast.csv")
    assert forecast.read_text().startswith("station,")
    assert shown(cells["cancel"]).endswith("'KILLED'")

    api = RunsApi(TrackingClient(embedded.uri, embedded.credential()))
    experiment = api.get_experiment_by_name("weather-forecast")["experiment_id"]
    runs = api.search_runs(
        [experiment],
        filter_string=f"attributes.start_time >= {started}",
        order_by=["attributes.start_time ASC"],
    )[0]
    tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
    assert [(t["mantik.entry_point"], t["mantik.source"]) for t in tags] == [
        ("main", "notebook"),
        ("main", "notebook"),
        ("sleep", "notebook"),
    ]
    assert [r["info"]["status"] for r in runs] == ["FINISHED", "FINISHED", "KILLED"]
