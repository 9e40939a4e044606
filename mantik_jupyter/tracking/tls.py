"""How the lab checks a remote tracking server's TLS certificate.

The lab reaches the tracking server two ways (its REST client and the MLflow proxy);
both trust the same certificates, chosen by MLflow's own client settings so that one
environment works for the lab, kernels and jobs alike:

- ``MLFLOW_TRACKING_SERVER_CERT_PATH``: a CA bundle (a site's own CA);
- ``MLFLOW_TRACKING_INSECURE_TLS=true``: no verification (a test server only);
- otherwise the ``certifi`` bundle, as requests uses it.
"""

from __future__ import annotations

import functools
import os
import ssl
import stat

import certifi

from ..errors import ConfigError

ENV_CERT_PATH = "MLFLOW_TRACKING_SERVER_CERT_PATH"
ENV_INSECURE = "MLFLOW_TRACKING_INSECURE_TLS"


def insecure() -> bool:
    return os.environ.get(ENV_INSECURE, "").strip().lower() in ("1", "true", "yes")


def ca_bundle() -> str:
    path = os.environ.get(ENV_CERT_PATH, "").strip()
    if not path:
        return certifi.where()
    try:
        st = os.stat(path)  # one stat per call: the proxy asks on every HTTPS request
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise ConfigError(
            f"{ENV_CERT_PATH}={path} is not a file. Point it at the PEM bundle of the CA "
            "that signed the tracking server's certificate, or unset it."
        )
    _check_bundle(path, st.st_mtime_ns, st.st_size)
    return path


@functools.lru_cache(maxsize=4)
def _check_bundle(path: str, mtime_ns: int, size: int) -> None:
    """Refuse a file that holds no CA certificate (keyed by mtime: checked once a version)."""
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        # Otherwise every HTTPS call failed with "could not be verified: set
        # {ENV_CERT_PATH}", which is set, to the wrong file.
        raise ConfigError(
            f"{ENV_CERT_PATH}={path} holds no CA certificate that can be read "
            f"({getattr(exc, 'reason', None) or exc}). Point it at the PEM bundle of the CA "
            "that signed the tracking server's certificate."
        ) from None


def requests_verify() -> bool | str:
    """The ``verify`` argument for requests."""
    return False if insecure() else ca_bundle()


def ssl_context() -> ssl.SSLContext:
    no_verify = insecure()
    return _context(no_verify, None if no_verify else ca_bundle())


@functools.lru_cache(maxsize=4)
def _context(no_verify: bool, cafile: str | None) -> ssl.SSLContext:
    if no_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cafile)


def certificate_hint(uri: str, exc: BaseException | None = None) -> str:
    """What to do about a TLS failure at the tracking server ``uri``; ``exc``: the
    failure, when it is known."""
    if exc is not None and "CERTIFICATE_VERIFY_FAILED" not in str(exc):
        # No certificate to check: an https:// address of a plain-HTTP server (MLflow
        # serves HTTP) failed with "wrong version number", and was blamed on the CA.
        return (
            f"The tracking server {uri} did not answer in TLS, so its certificate could not "
            "be checked: if it serves plain HTTP (as `mlflow server` does), its address "
            "starts with http://; else check the port."
        )
    given = os.environ.get(ENV_CERT_PATH, "").strip()
    if given:
        return (
            f"The certificate of the tracking server {uri} could not be verified with the CA "
            f"bundle {ENV_CERT_PATH}={given}. Add the CA that signed it to that bundle, or "
            "check that the URI names the right server."
        )
    return (
        f"The certificate of the tracking server {uri} could not be verified. If it is signed "
        f"by your site's own CA, set {ENV_CERT_PATH} to that CA's PEM bundle (in the "
        "environment of `jupyter lab`, or of the `mantik` command)."
    )
