"""mrict_dask: paired brain MRI/CT DICOM -> registered, normalized, chunked Zarr, on any Dask cluster."""

__version__ = "0.1.0"
