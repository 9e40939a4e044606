"""%mantik_login in a real IPython shell against the real MLflow server."""

from __future__ import annotations

import pytest

from mantik_jupyter.tracking.credentials import CredentialStore


@pytest.fixture
def lab_env(monkeypatch, tmp_path, mlflow_server):
    monkeypatch.setenv("MANTIK_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MANTIK_CREDENTIALS_FILE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return tmp_path


def test_login_asks_for_the_password_and_never_echoes_or_stores_it(
    ip, lab_env, mlflow_server, monkeypatch, capsys
):
    user = mlflow_server.create_user()
    prompts: list[str] = []
    monkeypatch.setattr(
        "getpass.getpass", lambda prompt="": prompts.append(prompt) or user.password
    )
    ip.run_cell(f"%mantik_login --username {user.username}", store_history=True)
    out = capsys.readouterr().out
    assert f"as {user.username}" in out and user.password not in out
    assert prompts == ["Password: "]
    history = " ".join(src for _, _, src in ip.history_manager.get_range())
    assert user.password not in history
    stored = CredentialStore(lab_env / "credentials.json").get(mlflow_server.uri)
    assert stored is not None and stored.username == user.username


def test_wrong_password_is_one_readable_line(ip, lab_env, mlflow_server, monkeypatch, capsys):
    user = mlflow_server.create_user()
    monkeypatch.setattr("getpass.getpass", lambda prompt="": "wrong-password-123")
    ip.run_line_magic("mantik_login", f"-u {user.username}")
    out = capsys.readouterr().out.strip()
    assert out.startswith("mantik: ") and "refused" in out and "\n" not in out
    assert "Traceback" not in out


def test_interrupt_at_the_password_prompt_is_one_line(ip, lab_env, monkeypatch, capsys):
    # Interrupting the kernel at the prompt showed a KeyboardInterrupt traceback.
    def interrupt(prompt=""):
        raise KeyboardInterrupt("Interrupted by user")

    monkeypatch.setattr("getpass.getpass", interrupt)
    assert ip.run_line_magic("mantik_login", "-u someone") is None
    assert capsys.readouterr().out.strip() == "mantik: interrupted."


def test_help_is_real(ip):
    doc = ip.find_line_magic("mantik_login").__doc__
    assert "--username" in doc and "--token" in doc
