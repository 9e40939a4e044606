"""Domain errors of the core, and their one mapping to the faces.

Every failure kind the core can report has one class here. Each class carries
the HTTP status the REST handlers answer with, the exit code of the ``mantik``
command, and a short machine-readable ``reason``. Handlers, the CLI and the
magics read these attributes and nothing else, so the mapping lives in one place.

Messages must name the file, key or value at fault and say what to do. They must
never contain a secret (password, token, private key).
"""

from __future__ import annotations


class MantikError(Exception):
    """Base of all domain errors."""

    status: int = 500
    exit_code: int = 1
    reason: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"message": self.message, "reason": self.reason}


class InvalidRequest(MantikError):
    """A request that cannot be understood (malformed JSON, a missing field)."""

    status = 400
    exit_code = 2
    reason = "invalid_request"


class ConfigError(MantikError):
    """A compute backend config that is missing, unparsable or invalid."""

    status = 400
    exit_code = 2
    reason = "invalid_config"


class ProjectError(MantikError):
    """An MLproject that is missing or invalid, or parameters that do not fit it."""

    status = 400
    exit_code = 2
    reason = "invalid_project"


class PackageTooLarge(ProjectError):
    """The code package exceeds the configured size limit."""

    status = 413
    reason = "package_too_large"


class UnsafePath(MantikError):
    """A user path that would leave the directory it belongs to."""

    status = 400
    exit_code = 2
    reason = "unsafe_path"


class NotLoggedIn(MantikError):
    """No credential is stored for the tracking server."""

    status = 401
    exit_code = 3
    reason = "not_logged_in"


class AuthenticationFailed(MantikError):
    """A server (tracking, SSH, UNICORE) refused the credential."""

    status = 401
    exit_code = 3
    reason = "authentication_failed"


class PermissionDenied(MantikError):
    """The credential is valid but lacks the permission for this action."""

    status = 403
    exit_code = 3
    reason = "permission_denied"


class NotFound(MantikError):
    """An unknown run, experiment, file or backend."""

    status = 404
    exit_code = 4
    reason = "not_found"


class Ambiguous(MantikError):
    """A run id prefix or name that matches more than one run."""

    status = 409
    exit_code = 4
    reason = "ambiguous"


class Conflict(MantikError):
    """An action that does not fit the current state (cancel a finished run)."""

    status = 409
    exit_code = 4
    reason = "conflict"


class TrackingUnavailable(MantikError):
    """The tracking server cannot be reached or answered with a server error."""

    status = 502
    exit_code = 5
    reason = "tracking_unavailable"


class BackendUnavailable(MantikError):
    """The compute backend (cluster, site) cannot be reached."""

    status = 502
    exit_code = 5
    reason = "backend_unavailable"


class HostKeyUnknown(BackendUnavailable):
    """An SSH host whose key is not in known_hosts (or does not match it)."""

    reason = "host_key_unknown"


class BackendRejected(MantikError):
    """The backend refused the job (sbatch error, UNICORE rejected the description)."""

    status = 502
    exit_code = 5
    reason = "backend_rejected"


class LocalStateInvalid(MantikError):
    """A file mantik keeps on the lab's machine (the credential store, the embedded
    server's secrets) that cannot be read, belongs to another user, or was edited into
    something mantik cannot use."""

    status = 500
    exit_code = 2
    reason = "invalid_local_state"


class TrackingTimeout(MantikError):
    """The tracking server took too long: the embedded one did not become healthy in
    time, or a server stopped taking an upload sent through the proxy."""

    status = 504
    exit_code = 6
    reason = "tracking_timeout"


def exit_code_table() -> list[tuple[int, str]]:
    """Exit codes of the ``mantik`` command, for its help text."""
    seen: dict[int, list[str]] = {}
    for cls in _all_subclasses(MantikError):
        seen.setdefault(cls.exit_code, []).append(cls.reason)
    return sorted((code, ", ".join(sorted(set(names)))) for code, names in seen.items())


def _all_subclasses(cls: type[MantikError]) -> list[type[MantikError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out
