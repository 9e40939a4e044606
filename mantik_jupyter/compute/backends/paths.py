"""Path checks shared by the backends: user paths stay inside the run directory."""

from __future__ import annotations

from ...errors import UnsafePath


def safe_name(name: str, what: str) -> str:
    """``name`` if it is one usable path component (no ``/``, not ``.``/``..``)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafePath(f"{name!r} is not a usable {what} (one path component expected)")
    return name


def clean_relative(path: str) -> str:
    """``path`` as a normalised relative path; refuses absolute paths and ``..``."""
    path = (path or "").replace("\\", "/")
    if path.startswith("/") or path.startswith("~") or "\0" in path:
        raise UnsafePath(f"{path!r} must be relative to the run directory")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"{path!r} leads outside the run directory ('..' is not allowed)")
    return "/".join(parts)
