"""A DICOMweb service (a PACS, or a cloud DICOM store) as an input: ``dicomweb+http(s)://host[:port]/root``.

The URL is the service root without the ``dicomweb+`` prefix. What moves over the network:

- **scan** (metadata only): QIDO-RS lists the studies and each study's series (with their instance counts) on the
  driver; each scan task retrieves the WADO-RS metadata (DICOM JSON) of a batch of series, one request per series,
  and turns every instance into a catalog row with the file scan's own code
  (:func:`~mrict_dask.dicom_header.row_from_dataset`). No instance bytes move. A row's ``url`` names the
  instance: ``<root>/studies/<study>/series/<series>/instances/<sop>``.
- **pair tasks** retrieve only the instances of their two series with WADO-RS (``application/dicom``, transfer
  syntax as stored: no transcoding on the server), a bounded number at a time.

Credentials come from the environment of each process (the CLI and every worker), never from the URL, the
storage options or task arguments: ``MRICT_DICOMWEB_USER`` / ``MRICT_DICOMWEB_PASSWORD`` (HTTP basic) or
``MRICT_DICOMWEB_TOKEN`` (bearer). TLS: ``REQUESTS_CA_BUNDLE`` names a site's CA bundle.

Failures follow the object-storage rules: 5xx, 429 (after its Retry-After) and dropped connections are retried
with backoff, then raised as :class:`DicomwebUnavailable` (a ``ConnectionError``: the scan records a storage error,
the orchestrator retries the pair task, then records the pair failed); 401/403 is a ``PermissionError`` and 404 a
``FileNotFoundError`` (not retried). Messages never carry URLs (they hold UIDs) or credentials.

``pixel_data_ok`` of a DICOMweb row: metadata carries no pixel bytes (bulk data is a URI or left out), so a
readable row of an image (pixel data named in the metadata, or Rows > 0) is marked ``True`` ("nothing in the
metadata speaks against its pixel data") and the plan treats it like a file whose pixel data was found; a
non-image (a structured report) is ``False`` as in a file scan. The bytes are checked when a pair task reads the series
(:func:`~mrict_dask.volume.read_volume`): missing or truncated pixel data then fails that pair with the reason,
where a file scan would have refused the series at plan time.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import InputError
from .io import DICOMWEB_PREFIX
from .types import Instance

log = logging.getLogger(__name__)

USER_ENV, PASSWORD_ENV, TOKEN_ENV = "MRICT_DICOMWEB_USER", "MRICT_DICOMWEB_PASSWORD", "MRICT_DICOMWEB_TOKEN"

ATTEMPTS = 4
"""Tries per request before a transient failure is raised (backoff 0.5, 1, 2 s; a Retry-After wins)."""
BACKOFF_S = 0.5
MAX_RETRY_AFTER_S = 60.0
CONNECTIONS = 8
"""Requests in flight per process and task (instances of a pair, series of a scan batch)."""
TIMEOUT_S = (10.0, 120.0)
"""(connect, read) timeout of one request."""
UNKNOWN_SERIES_SIZE = 100
"""Instances assumed for a series whose QIDO result does not say (batching only)."""

_ANY_SYNTAX = (("application/dicom", "*"),)  # as stored: no transcoding on the server
_URL = re.compile(r"^dicomweb\+(https?)://([^/?#]+)(/[^?#]*)?$")
_PATH = re.compile(r"/studies/([^/]+)/series/([^/]+)(?:/instances/([^/]+))?/?$")
_N_INSTANCES = "00201209"  # NumberOfSeriesRelatedInstances
_PIXEL_TAGS = ("7FE00010", "7FE00008", "7FE00009")  # (float, double float) pixel data

T = TypeVar("T")


class DicomwebUnavailable(ConnectionError):
    """The service did not answer usefully (connection refused or dropped, 5xx, 429) after every retry."""


class DicomwebRefused(PermissionError):
    """The service refused the credentials (401) or the access (403)."""


class DicomwebNotFound(FileNotFoundError):
    """The service does not hold the requested resource (404)."""


class DicomwebError(OSError):
    """Any other answer the service gave that retrying cannot change (4xx, a body that is not what was asked)."""


# ------------------------------------------------------------------------------------------------ URLs
def split_url(url: str) -> tuple[str, str]:
    """(``http(s)://host/root``, the path below the root: '' or ``/studies/...``) of a ``dicomweb+`` URL."""
    from .io import has_credentials

    if has_credentials(url):  # the URL itself is not repeated: it holds the secret
        raise InputError(f"credentials do not belong in the URL (it is logged and kept in the catalog); set "
                         f"{USER_ENV} and {PASSWORD_ENV}, or {TOKEN_ENV}")
    m = _URL.match(url.strip())
    if not m:
        raise InputError(f"{_safe(url)}: not a DICOMweb URL; write dicomweb+https://HOST[:PORT]/ROOT")
    scheme, host, path = m.group(1), m.group(2), (m.group(3) or "").rstrip("/")
    below = ""
    k = path.find("/studies/")
    if k >= 0 or path.endswith("/studies"):
        k = k if k >= 0 else len(path) - len("/studies")
        path, below = path[:k], path[k:]
    return f"{scheme}://{host}{path}", below


def _safe(url: str) -> str:
    """``url`` without any user:password@ part or query (an access token) (for messages)."""
    from .io import mask_userinfo

    return mask_userinfo(url.split("?", 1)[0].split("#", 1)[0])


def _uids(url: str) -> tuple[str, str, str | None]:
    _, below = split_url(url)
    m = _PATH.match(below)
    if not m:
        raise DicomwebError("not a series or instance URL of a DICOMweb service")
    return m.group(1), m.group(2), m.group(3)


# ------------------------------------------------------------------------------------------------ HTTP
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _credentials() -> tuple[str | None, ...]:
    # a value read from a file or a Secret often ends in a newline, which no HTTP header may hold
    return tuple((v.strip("\r\n") or None) if (v := os.environ.get(k)) is not None else None
                 for k in (USER_ENV, PASSWORD_ENV, TOKEN_ENV))


def _session(user: str | None, password: str | None, token: str | None) -> Any:
    import requests

    session = requests.Session()
    if user:
        session.auth = (user, password or "")
    elif token:
        session.headers["Authorization"] = f"Bearer {token}"
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=2 * CONNECTIONS)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def client_for(root: str) -> Any:
    """The process's ``dicomweb_client.DICOMwebClient`` for a service root (``http(s)://host/root``).

    Its own retries are off: :func:`call` retries with the object-storage rules. Its logger says which UIDs it
    fetches at INFO, so it is kept at WARNING. Credentials are read from the environment now (a changed
    environment gets a new client).
    """
    creds = _credentials()
    with _clients_lock:
        client = _clients.get((root, creds))
        if client is None:
            from dicomweb_client.api import DICOMwebClient

            logging.getLogger("dicomweb_client").setLevel(max(logging.WARNING,
                                                              logging.getLogger("dicomweb_client").level))
            client = DICOMwebClient(url=root, session=_session(*creds), timeout=TIMEOUT_S)
            client.set_http_retry_params(retry=False)
            _clients[(root, creds)] = client
        return client


def _retry_after(response: Any) -> float | None:
    value = (response.headers.get("Retry-After") or "").strip() if response is not None else ""
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, when - time.time()))


def call(fn: Callable[[], T], what: str, attempts: int = ATTEMPTS) -> T:
    """``fn()`` (one DICOMweb request), retried on 5xx, 429 and dropped connections; errors as described above.

    ``what`` names the request kind in messages ("series metadata", "instance"); never a URL.
    """
    import requests

    for attempt in range(1, attempts + 1):
        delay = BACKOFF_S * 2 ** (attempt - 1)
        try:
            return fn()
        except requests.HTTPError as exc:
            response = exc.response
            code = response.status_code if response is not None else 0
            if code in (401, 403):
                raise DicomwebRefused(f"{what}: the DICOMweb service refused access (HTTP {code})") from None
            if code == 404:
                raise DicomwebNotFound(f"{what}: not found on the DICOMweb service (HTTP 404)") from None
            if code != 429 and code < 500:
                raise DicomwebError(f"{what}: the DICOMweb service answered HTTP {code}") from None
            reason = f"HTTP {code}"
            asked = _retry_after(response)
            delay = asked if asked is not None else delay
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            reason = type(exc).__name__
        except (ValueError, requests.RequestException) as exc:  # a body that does not decode, redirect loops, ...
            raise DicomwebError(f"{what}: the DICOMweb service sent an unreadable answer "
                                f"({type(exc).__name__})") from None
        if attempt == attempts:
            raise DicomwebUnavailable(f"{what}: the DICOMweb service did not answer ({reason}; {attempts} attempts)")
        log.debug("%s: %s, retrying in %.1f s (attempt %d of %d)", what, reason, delay, attempt, attempts)
        time.sleep(delay)
    raise AssertionError("unreachable")


def _first(item: dict, tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


# ------------------------------------------------------------------------------------------------ rows
def instance_row(series_url: str, item: dict, k: int = 0) -> dict:
    """The catalog row of one instance's DICOM JSON metadata (the file scan's columns; see the module docstring)."""
    import pydicom

    from .catalog import empty_row
    from .dicom_header import _Quiet, row_from_dataset, unreadable

    sop = _first(item, "00080018")
    url = f"{series_url}/instances/{sop}" if sop else f"{series_url}#item{k + 1}"
    try:
        # only the elements the file scan reads: most of the time goes to converting the others
        tags = _wanted_tags()
        wanted = {tag: value for tag, value in item.items() if tag.upper() in tags}
        with _Quiet():  # pydicom's warnings about a malformed value quote the value (a date, a name)
            ds = pydicom.Dataset.from_json(wanted, bulk_data_uri_handler=lambda tag, vr, uri: None)
        row = row_from_dataset(url, None, ds)
    except Exception as exc:  # a malformed element: the instance keeps its row, with the reason
        row = empty_row(url, 0)
        row["size"] = None
        row["read_error"] = unreadable(exc)
        return row
    if not sop and not row["read_error"]:
        row["read_error"] = "unreadable: metadata without SOPInstanceUID"
    if row["transfer_syntax_uid"] is None:
        row["transfer_syntax_uid"] = _first(item, "00083002")  # AvailableTransferSyntaxUID, when the server tells
    # an image's pixel data may be left out of metadata (bulk data): rows > 0 is enough to expect it
    declared = any(tag in item for tag in _PIXEL_TAGS) or bool(row["rows"])
    row["pixel_data_ok"] = declared and not row["read_error"]
    return row


@functools.cache
def _wanted_tags() -> frozenset[str]:
    """The tags of the elements the file scan reads, as DICOM JSON keys."""
    from .dicom_header import _SPECIFIC_TAGS

    return frozenset(f"{t:08X}" for t in _SPECIFIC_TAGS)


def series_rows(series_url: str, metadata: list[dict]) -> list[dict]:
    return [instance_row(series_url, item, k) for k, item in enumerate(metadata)]


def instances_stamp(sop_uids: Any) -> str:
    """The stamp of a series: a digest of its SOPInstanceUIDs, in any order."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(str(u) for u in sop_uids)).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ source
class DicomwebSource:
    """The :class:`~mrict_dask.sources.Source` of a DICOMweb service root (see the module docstring)."""

    unit_name = "instances"

    def __init__(self, url: str, storage_options: dict | None = None):
        self.root, _ = split_url(url)
        self.url = DICOMWEB_PREFIX + self.root
        # the run's storage options are for its fsspec outputs; this source has none of its own
        self.storage_options = dict(storage_options or {})

    def __repr__(self) -> str:
        return f"DicomwebSource({self.url!r})"

    def __getstate__(self) -> dict:
        return {"root": self.root, "url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def client(self) -> Any:
        return client_for(self.root)

    # -- scan
    def list_units(self) -> list[tuple[str, int]]:
        """(series URL, instances) of every series, through QIDO-RS; InputError when the service cannot be read."""
        try:
            studies = call(lambda: self.client.search_for_studies(fields=["StudyInstanceUID"], get_remaining=True),
                           "study search")
            study_uids = sorted({u for u in (_first(s, "0020000D") for s in studies) if u})
            if not study_uids:
                raise InputError(f"no studies at {self.url}")
            with ThreadPoolExecutor(CONNECTIONS) as pool:
                found = list(pool.map(self._series_of, study_uids))
        except DicomwebRefused:
            raise InputError(f"{self.url}: the DICOMweb service refused the credentials; set {USER_ENV} and "
                             f"{PASSWORD_ENV} (HTTP basic) or {TOKEN_ENV} (bearer) for the CLI and every worker"
                             ) from None
        except DicomwebNotFound:
            raise InputError(f"{self.url}: no DICOMweb service answers there (HTTP 404 for its studies); the URL "
                             "must be the service root, e.g. dicomweb+https://pacs.example.org/dicom-web") from None
        except (DicomwebUnavailable, DicomwebError) as exc:
            raise InputError(f"{self.url}: {str(exc).split(': ', 1)[-1]}") from None
        units = sorted(u for series in found for u in series)
        if not units:
            raise InputError(f"no series at {self.url}")
        return units

    def listing(self) -> list[tuple[str, int, str]]:
        """(series URL, instances, stamp) of every series: the stamp is a digest of the series' SOPInstanceUIDs
        (one QIDO-RS instance search per series), so a series re-sent with other instances is told apart even
        when its count is the same. :func:`instances_stamp` of the catalog's rows of a series gives the same."""
        units = self.list_units()
        try:
            with ThreadPoolExecutor(CONNECTIONS) as pool:
                stamps = list(pool.map(self._stamp_of, [u for u, _ in units]))
        except DicomwebRefused:
            raise InputError(f"{self.url}: the DICOMweb service refused the credentials") from None
        except (DicomwebUnavailable, DicomwebError, DicomwebNotFound) as exc:
            raise InputError(f"{self.url}: {str(exc).split(': ', 1)[-1]}") from None
        return [(u, n, stamp) for (u, n), stamp in zip(units, stamps)]

    def _stamp_of(self, series_url: str) -> str:
        study, series, _ = _uids(series_url)
        found = call(lambda: self.client.search_for_instances(study, series, fields=["SOPInstanceUID"],
                                                              get_remaining=True), "instance search")
        return instances_stamp(u for u in (_first(i, "00080018") for i in found) if u)

    def unit_urls(self, row_urls: Any) -> Any:
        """The series URL of each row URL (``.../series/SE/instances/I`` -> ``.../series/SE``)."""
        import pyarrow.compute as pc

        return pc.replace_substring_regex(row_urls, r"/instances/[^/]+$", "")

    def _series_of(self, study_uid: str) -> list[tuple[str, int]]:
        series = call(lambda: self.client.search_for_series(
            study_uid, fields=["SeriesInstanceUID", _N_INSTANCES], get_remaining=True), "series search")
        out = []
        for s in series:
            uid = _first(s, "0020000E")
            if uid:
                n = _first(s, _N_INSTANCES)
                out.append((f"{self.url}/studies/{study_uid}/series/{uid}", int(n) if n else 0))
        return out

    def weight(self, unit: tuple[str, int]) -> int:
        return unit[1] or UNKNOWN_SERIES_SIZE

    def read_rows(self, units: list[tuple[str, int]]) -> Any:
        """The catalog table of a batch of series: one metadata request per series, a few at a time."""
        from .catalog import catalog_table

        with ThreadPoolExecutor(min(CONNECTIONS, max(1, len(units)))) as pool:
            parts = list(pool.map(self._rows_of, [u for u, _ in units]))
        return catalog_table([row for rows in parts for row in rows])

    def _rows_of(self, series_url: str) -> list[dict]:
        from .dicom_header import unreadable

        try:
            study, series, _ = _uids(series_url)
            metadata = call(lambda: self.client.retrieve_series_metadata(study, series), "series metadata")
            if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
                raise DicomwebError("series metadata: the DICOMweb service sent no list of data sets")
        except Exception as exc:  # the series cannot be listed: one row says why, the scan goes on
            return self.lost_rows([(series_url, 0)], unreadable(exc, storage=True))
        return series_rows(series_url, metadata)

    def lost_rows(self, units: list[tuple[str, int]], reason: str) -> list[dict]:
        """One row per series (its instances are unknown without its metadata), size unknown."""
        from .catalog import empty_row

        rows = []
        for url, _ in units:
            row = empty_row(url, 0)
            row.update(size=None, read_error=reason)
            rows.append(row)
        return rows

    # -- pair tasks
    def fetch(self, urls: Sequence[str]) -> list[Instance]:
        """The instances (parsed data sets, as stored) of instance URLs, ``CONNECTIONS`` at a time.

        After a transient failure the requests not yet made are not made: the caller retries the whole read.
        """
        urls = list(urls)
        stop = threading.Event()
        given_up: list[BaseException] = []

        def one(url: str) -> Instance:
            if stop.is_set():
                return given_up[0]
            try:
                study, series, sop = _uids(url)
                if sop is None:
                    raise DicomwebError("not an instance URL")
                return call(lambda: self.client.retrieve_instance(study, series, sop, media_types=_ANY_SYNTAX),
                            "instance")
            except DicomwebUnavailable as exc:
                given_up.append(exc)
                stop.set()
                return exc
            except Exception as exc:
                return exc

        with ThreadPoolExecutor(min(CONNECTIONS, max(1, len(urls)))) as pool:
            return list(pool.map(one, urls))
