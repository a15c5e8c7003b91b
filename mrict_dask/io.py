"""Where data lives: one :class:`Location` type for every URL the job reads or writes.

A location is a URL (local path, ``s3://``, any fsspec protocol, or a ``::`` chain of them) together with its
storage options, validated once when it is made: an unknown protocol, a malformed URL or a storage client that is
not installed is an :class:`~mrict_dask.errors.InputError` naming the problem, not a traceback from deep inside a
stage. Everything a stage does with storage (join, exists, read, write with parents, list) goes through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import threading
from functools import cached_property
from typing import Any

import fsspec

from .errors import ConfigError, InputError

# Errors that say nothing about the object itself: the same request may well succeed a moment later.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ClientPayloadError", "ServerDisconnectedError", "ClientConnectorError", "ClientOSError"}
_LOCAL_PROTOCOLS = ("file", "local")
DICOMWEB_PREFIX = "dicomweb+"
"""How an input URL names a DICOMweb service root (``dicomweb+https://host/root``): an input, never a store."""
# Storage option values shown as they are in logs: settings, not secrets. Every other value is shown as '***'
# (connection strings, headers, passwords under any name, lists of them).
_SHOWN_OPTIONS = {"endpoint_url", "anon", "region_name", "use_ssl", "requester_pays", "default_block_size",
                  "default_fill_cache", "default_cache_type", "version_aware", "cache_regions", "max_concurrency",
                  "skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "asynchronous",
                  "config_kwargs", "client_kwargs", "s3_additional_kwargs", "connect_timeout", "read_timeout",
                  "retries", "max_pool_connections", "addressing_style", "signature_version", "verify",
                  "block_size", "project", "account_name", "auto_mkdir", "timeout"}


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` JSON as a dict ({} when not given)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--storage-options is not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return value


def redact(storage_options: dict | None) -> dict:
    """A copy safe to log: only the values of well-known settings are shown (nested settings too); every other
    value, whatever its key is called, is '***'."""
    out: dict = {}
    for k, v in (storage_options or {}).items():
        if str(k) not in _SHOWN_OPTIONS:
            out[k] = "***"
        elif isinstance(v, dict):
            out[k] = redact(v)
        elif isinstance(v, str):
            out[k] = mask_userinfo(v)  # user:password@ in an endpoint URL
        elif isinstance(v, (bool, int, float, type(None))):
            out[k] = v
        else:
            out[k] = "***"
    return out


class RedactedOptions(dict):
    """Storage options whose ``repr`` hides secrets: what a task carries to the workers (which log task arguments)."""

    def __repr__(self) -> str:
        return repr(redact(self))

    __str__ = __repr__


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
    """``base/part/...`` with single slashes (URLs and paths alike)."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def _protocols(url: str) -> list[str]:
    """The protocols of a (possibly ``::``-chained) URL, outermost first; "file" for plain paths."""
    out = []
    for part in url.split("::"):
        protocol, _ = fsspec.core.split_protocol(part)
        out.append(protocol or "file")
    return out


def mask_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` part shown as ``***@`` (for logs and messages)."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def has_credentials(url: str) -> bool:
    """Does ``url`` carry a user name or password (``scheme://user:password@host/...``)? In an HTTP-based URL any
    '@' counts (a password may hold a '/', which would end the host part early)."""
    for part in url.split("::"):
        scheme, sep, rest = part.partition("://")
        if not sep:
            continue
        if "http" in scheme.lower():
            if "@" in rest:
                return True
        elif "@" in rest.split("/", 1)[0]:
            return True
    return False


CREDENTIALS_IN_URL = ("a URL holding credentials (user:password@) is refused: URLs are logged and kept in the "
                      "catalog; give credentials through --storage-options or the environment")


def check_protocol(url: str) -> None:
    """Raise InputError unless every protocol in ``url`` is one fsspec knows (built in or registered), and the URL
    holds no credentials."""
    from fsspec.registry import known_implementations, registry

    if has_credentials(url):
        raise InputError(CREDENTIALS_IN_URL)  # the URL itself is not repeated: it holds the secret
    known = set(known_implementations) | set(registry)
    for protocol in _protocols(url):
        if protocol.startswith(DICOMWEB_PREFIX):
            raise InputError(f"{url}: a DICOMweb service can only be an input, not a place to write or list files")
        if protocol not in known:
            raise InputError(f"unknown URL scheme '{protocol}://' in {url!r}: use a local path, s3://, another "
                             "fsspec protocol (gs://, az://, ...) or, for an input, dicomweb+https://")


class Location:
    """A URL and its storage options: the one way the job names a place to read or write.

    Cheap to make and to pickle (the filesystem is opened on first use, in whichever process uses it).
    ``str(loc)`` is the URL; ``repr`` shows the storage options with secrets redacted.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        if not isinstance(url, str) or not url.strip():
            raise InputError(f"a URL or path is needed, got {url!r}")
        check_protocol(url)
        self.url = url
        self.storage_options = dict(storage_options or {})

    @classmethod
    def of(cls, url: str | Location, storage_options: dict | None = None) -> Location:
        """``url`` as a Location; a Location is returned as it is (its own options win)."""
        if isinstance(url, Location):
            return url
        return cls(os.fspath(url) if hasattr(url, "__fspath__") else url, storage_options)

    # -- identity
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r}, {redact(self.storage_options)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.url, self.storage_options) == (other.url, other.storage_options)

    def __hash__(self) -> int:
        return hash((self.url, json.dumps(self.storage_options, sort_keys=True, default=str)))

    def __getstate__(self) -> dict:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.url = state["url"]
        self.storage_options = state["storage_options"]

    # -- the filesystem
    @cached_property
    def _fs_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        try:
            fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except ImportError as exc:
            raise InputError(f"{self.url}: the storage client for this protocol is not installed "
                             f"({str(exc).splitlines()[0][:200]})") from None
        except ValueError as exc:
            raise InputError(f"{self.url}: not a usable URL ({str(exc).splitlines()[0][:200]})") from None
        install_storage_retries(fs)
        return fs, path

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_path[0]

    @property
    def path(self) -> str:
        """The path inside :attr:`fs` (absolute for local files, ``bucket/key`` on object storage)."""
        return self._fs_path[1]

    @property
    def is_local(self) -> bool:
        return "::" not in self.url and _protocols(self.url)[0] in _LOCAL_PROTOCOLS

    @property
    def local_path(self) -> str:
        """The absolute local path (only for local locations)."""
        if not self.is_local:
            raise ValueError(f"{self.url} is not a local path")
        return os.path.abspath(self.url[len("file://"):] if self.url.startswith("file://") else self.url)

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.rstrip("/"))

    def _derived(self, url: str) -> Location:
        """Another URL on the same store: same storage options, no validation again."""
        other = Location.__new__(Location)
        other.url, other.storage_options = url, self.storage_options
        return other

    def join(self, *parts: str) -> Location:
        """A location below this one (same storage options)."""
        return self._derived(join(self.url, *parts))

    @property
    def parent(self) -> Location:
        url = self.url.rstrip("/")
        return self._derived(url.rsplit("/", 1)[0] if "/" in url else ".")

    def sibling(self, suffix: str) -> Location:
        """This URL with ``suffix`` appended (``store.zarr`` -> ``store.zarr.work``)."""
        return self._derived(self.url.rstrip("/") + suffix)

    def url_of(self, path: str) -> str:
        """The URL of a path of :attr:`fs` (as listings return them): a local path, or ``protocol://path``."""
        if self.is_local:
            return path
        return self.fs.unstrip_protocol(path)

    # -- reading and writing
    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def isfile(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def size(self) -> int:
        return int(self.fs.size(self.path) or 0)

    def open(self, mode: str = "rb", **kwargs: Any):
        if "w" in mode or "a" in mode:
            self.make_parent()
        return self.fs.open(self.path, mode, **kwargs)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def make_parent(self) -> None:
        parent = self.fs._parent(self.path)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)

    def write_bytes(self, data: bytes, durable: bool = False) -> None:
        """Write the whole object, making parent folders. Atomic: readers see the old or the new content.

        Local files are written to a temporary name and renamed (``durable``: flushed to disk first, for records
        that vouch for other data); on object storage one PUT is atomic.
        """
        if self.is_local:
            path = self.local_path
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = os.path.join(os.path.dirname(path) or ".",
                               f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
            return
        self.make_parent()
        self.fs.pipe_file(self.path, bytes(data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_json(self, obj: Any, **kwargs: Any) -> None:
        self.write_bytes(json.dumps(obj, **kwargs).encode("utf-8"))

    def numbered(self, suffix: str = ".json") -> list[int]:
        """The numbers ``N`` of the objects ``N<suffix>`` right below this folder, sorted ([] when it is absent).
        Listed afresh: a cached listing may miss what another process wrote a moment ago."""
        self.fs.invalidate_cache(self.path)
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        stems = (name.rstrip("/").rsplit("/", 1)[-1] for name in names)
        return sorted(int(stem[:-len(suffix)]) for stem in stems
                      if stem.endswith(suffix) and stem[:-len(suffix)].isdigit())

    def remove(self) -> None:
        """Delete this object if it is there (no existence check first: listings may be cached, deletes are not)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)
