"""Object-storage retries and storage errors a person can act on.

One retry policy for every filesystem Thresher opens (:func:`selector.data.workdir.open_fs` applies
it): on S3 (s3fs), botocore's own retries are turned off and s3fs retries a failed call on its
deterministic backoff (0.1 s x 1.7^i, capped at 15 s), with connection failures (refused,
unreachable, timed out) counted as retryable. The number of attempts and the connect timeout
are chosen so that a store that refuses or does not accept connections is given up on within ``retry_seconds``
(config ``storage.retry_seconds``, default 30; its tasks and actors get it as
``THRESHER_STORAGE_RETRY_SECONDS`` through :func:`workers.runtime.job_env`). Options set explicitly in ``storage_options``
(``config_kwargs.connect_timeout``, ``config_kwargs.read_timeout``, ``config_kwargs.retries``) win.

A store that accepts a connection and then never answers (a request in flight on a kept-alive
connection when the server stops, a hung proxy) is bounded by the read timeout,
:func:`read_timeout` (at least 5 s, botocore's default is 60 s), on each attempt: such a stall is
given up on within ``attempts x read_timeout`` plus the backoff sleeps (about 10 s for a 3 s
budget, 71 s for the default 30 s).

:func:`storage_error` turns an exception raised by fsspec/s3fs/botocore into a
:class:`StorageError` naming the URI, what happened (unreachable, denied, no such bucket) and
what to check, or returns None when the exception is not a storage problem. Secrets in storage
options are never part of a message: only ``endpoint_url`` is named.
"""

from __future__ import annotations

import os
import re
import socket

from selector.errors import StorageError

ENV_RETRY_SECONDS = "THRESHER_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 30.0

_REMOTE_PROTOCOLS = ("s3", "s3a")
_registered = False


def retry_seconds() -> float:
    """The storage retry budget of this process (``THRESHER_STORAGE_RETRY_SECONDS``, default 30 s)."""
    try:
        value = float(os.environ.get(ENV_RETRY_SECONDS, DEFAULT_RETRY_SECONDS))
    except ValueError:
        value = DEFAULT_RETRY_SECONDS
    return max(0.0, value)


def set_retry_seconds(seconds: float) -> None:
    """Set this process's retry budget; local Ray workers started afterwards inherit it."""
    os.environ[ENV_RETRY_SECONDS] = repr(float(seconds))


def _backoff(i: int) -> float:
    return min(1.7 ** i * 0.1, 15.0)  # s3fs's schedule (s3fs.core._error_wrapper)


def retry_plan(seconds: float) -> tuple[int, float]:
    """``(attempts, connect_timeout)`` such that every attempt timing out on connect, plus the
    backoff sleeps between them, fits in ``seconds``."""
    connect_timeout = min(5.0, max(1.0, seconds / 30.0))
    attempts, spent = 1, _backoff(0) + connect_timeout
    while spent + _backoff(attempts) + connect_timeout <= seconds:
        spent += _backoff(attempts) + connect_timeout
        attempts += 1
    return attempts, connect_timeout


def read_timeout(seconds: float) -> float:
    """Seconds one attempt waits for bytes on an open connection: the budget shared by its
    attempts, and never under 5 s (a slow first byte is not an outage)."""
    attempts, _ = retry_plan(seconds)
    return max(5.0, seconds / attempts)


def _register_retryable() -> None:
    """Count connection failures as retryable in s3fs (it retries only timeouts by default)."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        import s3fs.core
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:
        return
    for exc in (BotoConnectionError, ConnectionRefusedError):
        if exc not in s3fs.core.S3_RETRYABLE_ERRORS:
            s3fs.core.add_retryable_error(exc)


def open_filesystem(uri: str, storage_options: dict | None = None):
    """``(filesystem, path)`` for ``uri`` with the retry policy applied (S3); other protocols as fsspec opens them."""
    import fsspec

    options = dict(storage_options or {})
    protocol = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if protocol not in _REMOTE_PROTOCOLS:
        return fsspec.core.url_to_fs(uri, **options)
    _register_retryable()
    attempts, connect_timeout = retry_plan(retry_seconds())
    config_kwargs = dict(options.get("config_kwargs") or {})
    config_kwargs.setdefault("connect_timeout", connect_timeout)
    config_kwargs.setdefault("read_timeout", read_timeout(retry_seconds()))
    config_kwargs.setdefault("retries", {"total_max_attempts": 1})  # s3fs retries; botocore does not
    options["config_kwargs"] = config_kwargs
    fs, path = fsspec.core.url_to_fs(uri, **options)
    fs.retries = attempts  # an instance attribute in s3fs, not a constructor option
    return fs, path


# --------------------------------------------------------------------------- classification

_DENIED_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                 "AllAccessDisabled", "Forbidden", "403")
_UNREACHABLE_NAMES = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectTimeout", "ClientConnectorError",
                      "ServerDisconnectedError", "ReadTimeoutError", "FSTimeoutError", "ConnectionClosedError")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def classify(exc: BaseException) -> tuple[str, str] | None:
    """``(kind, reason)`` with kind unreachable / denied / no_bucket / no_credentials, or None."""
    for e in _chain(exc):
        name, code, text = type(e).__name__, _error_code(e), str(e)
        if name == "NoCredentialsError":
            return "no_credentials", "no credentials found"
        if name in _UNREACHABLE_NAMES or isinstance(e, (ConnectionRefusedError, socket.gaierror, socket.timeout)):
            return "unreachable", _short(text) or name
        if code in _DENIED_CODES or (isinstance(e, PermissionError) and not getattr(e, "filename", None)):
            return "denied", code or _short(text) or "access denied"
        if code == "NoSuchBucket" or "NoSuchBucket" in text or "specified bucket does not exist" in text:
            return "no_bucket", "the bucket does not exist"
    return None


def _short(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _endpoint(storage_options: dict | None) -> str | None:
    options = storage_options or {}
    return options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")


def request_uri(exc: BaseException) -> str | None:
    """The ``s3://bucket/key`` a failed request was for, read from the endpoint URL botocore reports
    (path-style ``http://host/bucket/key`` as with a custom endpoint, or virtual-hosted
    ``https://bucket.s3.<region>.amazonaws.com/key``); None when the error names no URL."""
    from urllib.parse import unquote, urlsplit

    for e in _chain(exc):
        url = (getattr(e, "kwargs", None) or {}).get("endpoint_url") if isinstance(getattr(e, "kwargs", None), dict) \
            else None
        if not url:
            continue
        parts = urlsplit(url)
        host, path = parts.hostname or "", unquote(parts.path).lstrip("/")
        hosted = re.match(r"^(?P<bucket>.+?)\.s3[.-]", host)
        if hosted:
            return f"s3://{hosted['bucket']}/{path}".rstrip("/")
        if path:
            return f"s3://{path}"
    return None


def storage_error(exc: BaseException, uri: str, what: str = "storage", setting: str | None = None,
                  storage_options: dict | None = None, elapsed: float | None = None) -> StorageError | None:
    """A :class:`StorageError` for ``exc`` raised while using ``uri``, or None if it is not a storage problem.

    ``what`` names the thing (``corpus``, ``work root``, ``shard x.jsonl``); ``setting`` the config
    section whose ``storage_options`` to check (``corpus``, ``work``).
    """
    found = classify(exc)
    if found is None:
        return None
    kind, reason = found
    if not uri:  # the caller does not know which object: name the one the failed request was for
        uri = request_uri(exc) or ""
    options_key = f"{setting}.storage_options" if setting else "storage_options"
    endpoint = _endpoint(storage_options)
    at = f" at {endpoint}" if endpoint else ""
    what = f"{what} {uri}".strip()
    if kind == "unreachable":
        waited = f"after {elapsed:.0f} s of retries " if elapsed is not None else ""
        message = (f"cannot reach the object store{at} for {what}: gave up {waited}"
                   f"(storage.retry_seconds: {retry_seconds():g}).\n"
                   f"  reason: {reason}\n"
                   f"  check: endpoint_url in {options_key}, the network, and that the store is up; "
                   "raise storage.retry_seconds to wait longer")
    elif kind == "no_bucket":
        message = (f"{what}: the bucket does not exist on the object store{at}.\n"
                   f"  check: the bucket name in the URI and endpoint_url in {options_key}")
    elif kind == "no_credentials":
        message = (f"{what}: no credentials for the object store{at}.\n"
                   f"  check: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment, the instance role, "
                   f"or key/secret in {options_key}")
    else:
        message = (f"access denied to {what} on the object store{at} ({reason}).\n"
                   f"  check: the credentials (environment, instance role, or key/secret in {options_key}) "
                   "and that they may list, read and write this bucket and prefix")
    error = StorageError(message)
    error.kind = kind
    return error
