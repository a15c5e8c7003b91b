"""How a task function is mapped over items: the one interface every stage that fans out uses (scan, pairs).

An executor's ``run(fn, items, key=...)`` yields one :class:`Outcome` per item, in completion order, with the
task's value or the error that remained after its retries; it never raises for a failed item. Items may be
a lazy iterable: an executor takes them only as it has room, so a caller can build each item (a pair's file
list, a scan batch) just before it is submitted.

:class:`SerialExecutor` (here) runs the very same task function in a plain loop and is the reference;
:class:`~mrict_dask.orchestrate.DaskExecutor` runs it on a Dask cluster with a bounded window of futures.
Only :mod:`mrict_dask.orchestrate` knows Dask: its ``as_executor`` turns a Dask client into that executor; this
module, below every stage that fans out, imports nothing above it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What became of one item: ``value`` when the task returned, else ``error`` (type and first line)."""

    item: Any
    value: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


_URL_OR_PATH = re.compile(r"""'[^']*[/\\][^']*'|"[^"]*[/\\][^"]*"|[A-Za-z][A-Za-z0-9+.-]*://\S+|[^\s'"()]*[/\\][^\s'"(),]*""")
"""Quoted strings holding a slash, URLs, and any word with a slash or backslash: paths (which may name patients)."""


def error_reason(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters): what a summary or marker records.

    URLs and file paths in the message are masked: paths often name patients, and the reason reaches the store.
    """
    if isinstance(exc, TaskError):
        return str(exc)
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {mask_paths(text)}"[:300]


def mask_paths(text: str) -> str:
    """``text`` with URLs and file paths replaced by ``<path>``."""
    return _URL_OR_PATH.sub("<path>", text)


class TaskError(Exception):
    """A task's exception as it leaves a worker: its :func:`error_reason` (type, first line, paths masked), since
    a Dask worker logs the exceptions of failed tasks and file paths often name patients."""


def guarded(fn: Callable[[Any], Any], item: Any) -> Any:
    """``fn(item)``, any exception turned into a :class:`TaskError` (what a worker runs for the executor)."""
    try:
        return fn(item)
    except Exception as exc:
        raise TaskError(error_reason(exc)) from None


class Executor(Protocol):
    name: str

    def run(self, fn: Callable[[Any], Any], items: Iterable[Any],
            key: Callable[[Any], str] | None = None) -> Iterator[Outcome]: ...


class SerialExecutor:
    """A plain loop over the same task function, with the same retry rule as the Dask executor."""

    name = "serial"

    def __init__(self, retries: int = 0):
        self.retries = max(0, int(retries))

    def run(self, fn: Callable[[Any], Any], items: Iterable[Any],
            key: Callable[[Any], str] | None = None) -> Iterator[Outcome]:
        for item in items:
            for attempt in range(self.retries + 1):
                try:
                    value = fn(item)
                except Exception as exc:
                    if attempt == self.retries:
                        # the reason only: a traceback's messages may quote file paths (PHI)
                        log.debug("task %s failed: %s", key(item) if key else "", error_reason(exc))
                        yield Outcome(item, None, error_reason(exc))
                    continue
                yield Outcome(item, value)
                break


def as_executor(executor: Any = None, retries: int = 2, window: int = 0) -> Executor:
    """``executor`` itself when it is one; None runs serially here.

    A Dask client is turned into its executor by :func:`mrict_dask.orchestrate.as_executor` (the module that knows
    Dask); given here it is refused with that advice, so this module never reaches up to the orchestration layer.
    """
    if executor is None:
        return SerialExecutor(retries)
    if hasattr(executor, "run") and hasattr(executor, "name"):
        return executor
    if hasattr(executor, "submit") and hasattr(executor, "nthreads"):  # a distributed.Client
        raise TypeError("a Dask client is not an executor here: pass mrict_dask.orchestrate.as_executor(client)")
    raise TypeError(f"not an executor: {type(executor).__name__}")
