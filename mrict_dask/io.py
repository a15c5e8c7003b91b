"""fsspec helpers: one place that turns URLs and storage options into filesystems."""

from __future__ import annotations

import json
from typing import Any

import fsspec


def parse_storage_options(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        from .errors import ConfigError

        raise ConfigError(f"--storage-options is not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        from .errors import ConfigError

        raise ConfigError("--storage-options must be a JSON object")
    return value


def get_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path-within-it) for ``url``; plain paths are local files."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    install_storage_retries(fs)
    return fs, path


# Errors that say nothing about the object itself: the same request may well succeed a moment later.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ClientPayloadError", "ServerDisconnectedError", "ClientConnectorError", "ClientOSError"}


def is_transient(exc: BaseException) -> bool:
    """A storage error worth retrying (connection reset, timeout, 5xx), as opposed to missing or forbidden."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in _TRANSIENT_NAMES:
        return True
    status = getattr(exc, "response", None)
    if isinstance(status, dict):  # botocore ClientError: retry server-side (5xx) errors only
        return int(status.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) >= 500
    return isinstance(exc, OSError) and getattr(exc, "errno", None) in (5, 104, 110, 111)  # EIO, reset, timeouts


_retries_installed = False


def install_storage_retries(fs: Any = None) -> None:
    """Let s3fs retry transient errors per request (with its backoff), not only its short list of types.

    s3fs retries a few error types itself and gives up at once on, e.g., a connection reset or a 503 that
    botocore did not absorb; zarr never retries. One failed request would then fail a whole pair or a store
    write. The handler is process-wide in s3fs; an existing one is kept and consulted first.
    """
    global _retries_installed
    if _retries_installed or (fs is not None and not any(c.__module__.split(".")[0] == "s3fs"
                                                         for c in type(fs).__mro__)):
        return
    import s3fs.core

    previous = s3fs.core.CUSTOM_ERROR_HANDLER
    s3fs.core.set_custom_error_handler(lambda exc: bool(previous(exc)) or is_transient(exc))
    _retries_installed = True


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL of ``path`` on ``fs`` (``s3://bucket/key``, or a local absolute path)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    fs, path = get_fs(url, storage_options)
    parent = fs._parent(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(data)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb") as fh:
        return fh.read()


def redact(storage_options: dict | None) -> dict:
    """A copy safe to log: secrets replaced by '***'."""
    secret_words = ("key", "secret", "token", "password", "credential")
    out: dict = {}
    for k, v in (storage_options or {}).items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(w in k.lower() for w in secret_words):
            out[k] = "***"
        else:
            out[k] = v
    return out
