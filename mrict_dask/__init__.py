"""mrict_dask: paired brain MRI/CT DICOM -> registered, normalized, chunked Zarr, on any Dask cluster.

Where each stage lives (each module does one thing; only ``orchestrate`` knows Dask):

- ``io``: :class:`~mrict_dask.io.Location`, a URL with its storage options: validation, join, read, write.
- ``sources`` (files through fsspec) and ``dicomweb`` (a PACS): the one input interface (list, read rows, fetch).
- ``dicom_header`` -> ``scan`` -> ``catalog``: header-only reading of one file / batches on the workers / the
  catalog's one schema, writer and reader; ``columns``: the catalog as arrays for the planner.
- ``geometry`` -> ``stacks`` -> ``selection`` -> ``plan``: patient geometry of a slice stack / catalog rows of a
  series into volumes (4D split) or refusals / candidates ranked on evidence / sessions, pairing and split.
- ``volume``: the pixels of one stack as a SimpleITK image; ``export`` is the ``export-series`` command.
- ``register``, ``normalize``, ``qa`` -> ``pair``: the science of one pair, a pure function.
- ``store``: the Zarr output (create, one region per pair, finalize, verify, inspect); ``loader``: reading it
  back for training; ``report``: the run report.
- ``executor`` (the interface and the serial loop) and ``orchestrate`` (Dask, the run): how tasks fan out.
- ``config``, ``pseudonym``, ``progress``, ``errors``, ``types``, ``values``: shared plumbing;
  ``synth``: the synthetic corpus generator; ``testing``: local servers for tests and benchmarks.
"""

__version__ = "0.1.0"
