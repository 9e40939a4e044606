"""The SSH connection to a login node: login, host keys, channels and remote commands.

One paramiko connection is kept and reused; when it drops (login node rebooted, sshd
restarted) the next call opens a new one, and a call that cannot reach the host raises
``BackendUnavailable`` (the RunService turns that into ``UNKNOWN``, never ``FAILED``).

A login node that stops answering (frozen sshd, silently dead link) must not hang a
caller: every channel gets ``io_timeout`` for its reads and writes, and the channel
requests paramiko awaits without a timeout (exec, the sftp subsystem) are bounded by a
watchdog that closes the channel. A timeout drops the connection like a broken link.

Security: host keys are checked against known_hosts and never added on the fly;
passwords and keys never appear in messages, logs or reprs.
"""

from __future__ import annotations

import io
import logging
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import paramiko

from ...errors import (
    AuthenticationFailed,
    BackendUnavailable,
    ConfigError,
    HostKeyUnknown,
    NotFound,
    PermissionDenied,
)
from .. import layout
from ..config import ENV_SSH_PASSWORD
from .base import describe_error

log = logging.getLogger(__name__)
T = TypeVar("T")


class _ReportedByMantik(logging.Filter):
    """paramiko's transport thread logs a failure it then hands to the caller (a login
    node that resets the connection, a refused key exchange) at ERROR, as a traceback of
    some 25 records. Where no logging is set up (a notebook's kernel, a script) Python
    prints them to stderr, into the notebook cell above mantik's own error; in a lab,
    into its log at every sync. mantik reports each such failure itself, as an error
    that says what to do: paramiko's account is kept at DEBUG, for whoever debugs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


# mantik's own connections log under a channel of their own: a user's own paramiko code
# in the same kernel keeps paramiko's account at ERROR.
LOG_CHANNEL = "paramiko.transport.mantik"
for _name in (LOG_CHANNEL, f"{LOG_CHANNEL}.sftp"):
    logging.getLogger(_name).addFilter(_ReportedByMantik())

COMMAND_TIMEOUT = 120.0

CONNECTION_ERRORS = (paramiko.SSHException, EOFError, OSError)
# paramiko's exit status of a command that ended without one: killed by a signal
# (sshd sends the signal's name instead), or its channel closed under it.
NO_EXIT_STATUS = -1


@dataclass
class CommandResult:
    status: int
    stdout: bytes
    stderr: bytes

    @property
    def err_text(self) -> str:
        return self.stderr.decode(errors="replace").strip()


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """RejectPolicy that tells the user how to trust the host."""

    def __init__(self, host: str, port: int, known_hosts: Path) -> None:
        self.host = host
        self.port = port
        self.known_hosts = known_hosts

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise HostKeyUnknown(
            f"The SSH host {self.host}:{self.port} (key {key.get_name()} {key.fingerprint}) "
            f"is not in {self.known_hosts}. Check the fingerprint against the site's "
            f"documentation, then trust it with: "
            f"{_keyscan_hint(self.host, self.port, self.known_hosts)}"
        )


def _keyscan_hint(host: str, port: int, known_hosts: Path) -> str:
    port_opt = f"-p {port} " if port != 22 else ""
    return f"ssh-keyscan {port_opt}{shlex.quote(host)} >> {shlex.quote(str(known_hosts))}"


_KEY_TYPES = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


def _load_private_key(
    text: str, passphrase: str | None, source: str = ""
) -> tuple[paramiko.PKey, bool]:
    """The key, and whether ``passphrase`` unlocked it (it is then not a password)."""
    encrypted = False
    for cls in _KEY_TYPES:
        try:
            return cls.from_private_key(io.StringIO(text)), False
        except paramiko.PasswordRequiredException:
            encrypted = True
            break
        except (paramiko.SSHException, ValueError):
            continue
    if encrypted and passphrase is None:
        raise AuthenticationFailed(
            f"The SSH private key{source} is encrypted: set {ENV_SSH_PASSWORD} to its passphrase."
        )
    if encrypted:
        # The OpenSSH format decrypts before it checks the key's type: try each type again.
        for cls in _KEY_TYPES:
            try:
                return cls.from_private_key(io.StringIO(text), password=passphrase), True
            except (paramiko.SSHException, ValueError):
                continue
    # Deliberately vague: the text of a key must never end up in a message.
    raise AuthenticationFailed(
        f"The SSH private key{source} could not be read: it is not an OpenSSH/PEM private "
        "key of type ed25519, ecdsa or rsa, or its passphrase is wrong."
    )


def _load_key_file(path: str, passphrase: str | None) -> tuple[paramiko.PKey, bool]:
    """The key of an identity file, read here rather than by paramiko: for a key file it
    tries every key type in turn and raises the last type's complaint ("encountered RSA
    key, expected OPENSSH key") instead of the server's refusal of the key."""
    try:
        text = Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a text file"
        raise ConfigError(
            f"SSH.IdentityFile {path} cannot be read ({why}); check the key's path in the "
            "compute backend config."
        ) from None
    return _load_private_key(text, passphrase, f" in {path}")


class SshConnection:
    """The one SSH connection to a login node, opened on first use and again after it
    dropped, shared by all threads.

    Credentials: ``key_filename`` (a private key file), ``private_key`` (the key's text)
    and ``password``: the passphrase of an encrypted key, and then never sent to the
    server, else the login password. With none of them, the SSH agent and
    ``~/.ssh/id_*`` are tried, like ``ssh``. ``io_timeout`` is how long a remote command
    or file operation may wait for the login node to answer before the connection is
    given up (``BackendUnavailable``).
    """

    def __init__(
        self,
        hostname: str,
        port: int = 22,
        username: str | None = None,
        key_filename: str | None = None,
        private_key: str | None = None,
        password: str | None = None,
        known_hosts: str | Path | None = None,
        connect_timeout: float = 15.0,
        io_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self.hostname = hostname
        self.port = int(port)
        self.username = username
        self._key_filename = key_filename
        self._pkey: paramiko.PKey | None = None
        unlocked = False
        if private_key:
            self._pkey, unlocked = _load_private_key(private_key, password)
        self._password = password
        # A passphrase offered to the server as a password would hand it the key's secret.
        self._login_password = None if unlocked else password
        self.known_hosts = Path(known_hosts or Path.home() / ".ssh" / "known_hosts").expanduser()
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self._client: paramiko.SSHClient | None = None
        # Guards the connection only: file sessions have locks of their own, taken
        # before this one, never after it.
        self._lock = threading.RLock()
        # Remote shell commands run so far; a benchmark asserts one per status poll.
        self.commands_issued = 0

    def __repr__(self) -> str:  # no credentials in reprs that end up in logs
        return f"SshConnection({self.where()})"

    def where(self) -> str:
        return f"{self.username or '?'}@{self.hostname}:{self.port}"

    # ---- the connection -----------------------------------------------------------------

    def client(self) -> paramiko.SSHClient:
        """The current connection, logging in anew if there is none or it dropped."""
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            if transport is None or not transport.is_active():
                self.drop()
                self._client = self._connect()
            assert self._client is not None
            return self._client

    def _connect(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_log_channel(LOG_CHANNEL)
        if self.known_hosts.is_file():
            client.load_system_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(
            _RefuseUnknownHost(self.hostname, self.port, self.known_hosts)
        )
        explicit = bool(self._key_filename or self._pkey or self._password)
        pkey, password = self._pkey, self._login_password
        if pkey is None and self._key_filename:
            pkey, unlocked = _load_key_file(self._key_filename, self._password)
            password = None if unlocked else self._password
        started = time.monotonic()
        try:
            client.connect(
                self.hostname,
                port=self.port,
                username=self.username,
                pkey=pkey,
                password=password,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                allow_agent=not explicit,
                look_for_keys=not explicit,
            )
        except HostKeyUnknown:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise self._host_key_changed(exc) from None
        except paramiko.AuthenticationException:
            client.close()
            raise AuthenticationFailed(
                f"The SSH server refused the credentials of {self.username}@{self.hostname} "
                f"(port {self.port}). Check the user name and the key or password."
            ) from None
        except (*CONNECTION_ERRORS, ValueError) as exc:
            client.close()
            # A host that takes the connection and never speaks ends in paramiko's "No
            # existing session", which says nothing of the wait or of what to check.
            waited = time.monotonic() - started >= self.connect_timeout
            why = f"no answer within {self.connect_timeout:g} s" if waited else describe_error(exc)
            user = f"{self.username}@" if self.username else ""
            raise BackendUnavailable(
                f"Cannot reach the SSH server {self.hostname}:{self.port}: {why}. Check "
                "SSH.Hostname and SSH.Port in the compute backend config, and that this "
                f"machine reaches the cluster: ssh -p {self.port} {user}{self.hostname} "
                "(from outside the site's network, a VPN or a jump host may be needed)."
            ) from None
        transport = client.get_transport()
        assert transport is not None
        # Keepalives let a silently dead link (no FIN) be noticed between polls.
        transport.set_keepalive(30)
        log.info("connected to %s", self.where())
        return client

    def _host_key_changed(self, exc: paramiko.BadHostKeyException) -> HostKeyUnknown:
        host = f"[{self.hostname}]:{self.port}" if self.port != 22 else self.hostname
        return HostKeyUnknown(
            f"The SSH host key of {self.hostname}:{self.port} does not match {self.known_hosts} "
            f"(got {exc.key.get_name()} {exc.key.fingerprint}). If the site announced a new "
            f"key, remove the old one with: ssh-keygen -R {shlex.quote(host)} -f "
            f"{shlex.quote(str(self.known_hosts))} and trust the new one with: "
            f"{_keyscan_hint(self.hostname, self.port, self.known_hosts)}"
        )

    def drop(self, client: paramiko.SSHClient | None = None) -> None:
        """Close the connection; with ``client``, only if that is still the current one
        (a thread that timed out on an old link must not close a fresh one). Sessions
        on it (SFTP, commands) close with it."""
        with self._lock:
            if client is not None and client is not self._client:
                return
            if self._client is not None:
                try:
                    self._client.close()
                except Exception:  # noqa: S110 - closing a dead link may fail any way
                    pass
            self._client = None

    def close(self) -> None:
        self.drop()

    # ---- channels -------------------------------------------------------------------------

    def open_channel(self, client: paramiko.SSHClient) -> paramiko.Channel:
        """A new session on ``client``, waiting up to ``io_timeout`` for one to come free
        when the server allows no more on one connection."""
        transport = client.get_transport()
        if transport is None:
            raise paramiko.SSHException("the SSH connection is closed")
        deadline = time.monotonic() + self.io_timeout
        pause = 0.05
        while True:
            try:
                channel = transport.open_session(timeout=self.connect_timeout)
                break
            except paramiko.ChannelException:
                # The server refused a session on a live connection: sshd's MaxSessions
                # (10 by default) are all held by transfers and log reads. Taken for a
                # lost link, dropping the connection cut all of them off; one ends soon.
                if time.monotonic() + pause > deadline:
                    raise BackendUnavailable(
                        f"The SSH server {self.hostname}:{self.port} allows no more "
                        f"sessions on one connection (sshd's MaxSessions), and none came "
                        f"free within {self.io_timeout:g} s: downloads, uploads and log "
                        "reads hold them all. Try again when some of them have ended."
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
        channel.settimeout(self.io_timeout)
        return channel

    def request(self, channel: paramiko.Channel, request: Callable[[], None]) -> None:
        """A channel request (exec, subsystem): paramiko waits for its answer without a
        timeout, so a watchdog closes the channel, which wakes the wait, after
        ``io_timeout``."""
        fired = threading.Event()

        def give_up() -> None:
            fired.set()
            channel.close()

        watchdog = threading.Timer(self.io_timeout, give_up)
        watchdog.daemon = True
        watchdog.start()
        try:
            request()
        except paramiko.SSHException:
            if fired.is_set():
                raise TimeoutError() from None
            raise
        finally:
            watchdog.cancel()

    @staticmethod
    def exit_status(channel: paramiko.Channel) -> int:
        # recv_exit_status() alone would wait forever for a node that stopped answering.
        if not channel.status_event.wait(channel.gettimeout()):
            raise TimeoutError()
        return channel.recv_exit_status()

    def with_connection(self, action: Callable[[], T], what: str, retry: bool = True) -> T:
        """Run ``action()`` needing the connection; reconnect once if the link was stale
        or stopped answering."""
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            client = self.client()
            try:
                return action()
            except FileNotFoundError as exc:
                raise NotFound(f"Not found on {self.hostname} while {what}: {exc}") from None
            except PermissionError as exc:
                raise PermissionDenied(
                    f"{self.hostname} denied access while {what}: {exc}"
                ) from None
            except CONNECTION_ERRORS as exc:
                self.drop(client)
                if attempt + 1 == attempts:
                    raise self.lost(exc, what) from None
        raise AssertionError("unreachable")

    def lost(self, exc: BaseException, what: str) -> BackendUnavailable:
        if isinstance(exc, TimeoutError):
            return BackendUnavailable(
                f"The SSH server {self.hostname}:{self.port} did not answer within "
                f"{self.io_timeout:g} s while {what}; the connection was closed. Try again "
                "later; if it keeps happening, the login node may be overloaded or down."
            )
        return BackendUnavailable(
            f"Lost the SSH connection to {self.hostname}:{self.port} while {what}: "
            f"{describe_error(exc)}"
        )

    # ---- remote commands ----------------------------------------------------------------

    def run(self, command: str, what: str, retry: bool = True) -> CommandResult:
        """Run one shell command; ``retry`` only for commands safe to run twice."""
        return self.with_connection(lambda: self.execute(command), what, retry)

    def execute(
        self,
        command: str,
        timeout: float | None = None,
        started: Callable[[paramiko.Channel], None] | None = None,
    ) -> CommandResult:
        """Run a command to its end; ``timeout`` (default ``io_timeout``) bounds each
        wait for output, not the whole command. ``started`` reads what it needs of stdout
        while the command runs on (left out of the result)."""
        channel = self.open_stream(command)
        try:
            if timeout is not None:
                channel.settimeout(timeout)
            if started is not None:
                started(channel)
            out, err = _drain(channel)
            status = self.exit_status(channel)
            transport = channel.get_transport()
            if status == NO_EXIT_STATUS and (transport is None or not transport.is_active()):
                # The output ended because the link did, not the command: a lost link,
                # not a command that failed with nothing to say.
                raise ConnectionResetError("the connection closed before the command ended")
            return CommandResult(status, out, err)
        finally:
            channel.close()

    def open_stream(
        self, command: str, client: paramiko.SSHClient | None = None
    ) -> paramiko.Channel:
        """A channel running ``command``, its output to be read by the caller."""
        channel = self.open_channel(client or self.client())
        self.commands_issued += 1
        try:
            # The login shell runs only "sh -s"; the command, POSIX sh, comes on stdin. A
            # csh or tcsh login shell refused our commands themselves (a quoted newline,
            # 2>/dev/null). Braces: sh reads the whole command before it runs any of it,
            # so nothing in it can read the rest as its input.
            self.request(channel, lambda: channel.exec_command("sh -s"))
            channel.sendall(b"{\n" + command.encode() + b"\n} </dev/null\n")
            channel.shutdown_write()
        except BaseException:
            channel.close()
            raise
        return channel


def _drain(channel: paramiko.Channel) -> tuple[bytes, bytes]:
    """stdout to its end, then stderr. Both share one SSH window, so this would stall
    only if a command wrote megabytes to stderr; none of ours does."""
    out = bytearray()
    while chunk := channel.recv(layout.CHUNK):
        out += chunk
    return bytes(out), rest_of_stderr(channel)


def read_line(channel: paramiko.Channel) -> bytes:
    """One line of stdout, byte by byte: nothing after it is consumed."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = channel.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


def rest_of_stderr(channel: paramiko.Channel) -> bytes:
    rest = bytearray()
    while chunk := channel.recv_stderr(layout.CHUNK):
        rest += chunk
    return bytes(rest)
