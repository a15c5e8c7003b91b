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
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


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
