"""QA figure: CT edges over MR in three planes of the template grid (PNG bytes, no text but plane names)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

# CT edges drawn as iso-contours of the normalized CT, at these HU (default window [-1024, 3071])
EDGE_HU = {"skin": -300.0, "bone": 300.0}


def _hu_level(hu: float, lo: float = -1024.0, hi: float = 3071.0) -> float:
    return (hu - lo) / (hi - lo)


def overlay_png(mr: np.ndarray, ct: np.ndarray, valid: np.ndarray, direction: Sequence[float] = (),
                ct_bounds: tuple[float, float] = (-1024.0, 3071.0), dpi: int = 80) -> bytes:
    """Axial, coronal and sagittal slices through the centre of the valid region: MR grey, CT edges in colour."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    idx = np.argwhere(valid)
    cz, cy, cx = (idx.mean(axis=0).astype(int) if len(idx) else np.array(mr.shape) // 2)
    planes = [("axial", mr[cz], ct[cz], "upper"),
              ("coronal", mr[:, cy, :], ct[:, cy, :], "lower"),
              ("sagittal", mr[:, :, cx], ct[:, :, cx], "lower")]
    fig = Figure(figsize=(12, 4.4))
    for i, (name, m, c, origin) in enumerate(planes):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.imshow(m, cmap="gray", vmin=0, vmax=1, origin=origin, interpolation="nearest")
        for color, hu in (("yellow", EDGE_HU["skin"]), ("red", EDGE_HU["bone"])):
            level = _hu_level(hu, *ct_bounds)
            if c.min() < level < c.max():
                ax.contour(c, levels=[level], colors=color, linewidths=0.6, origin=origin)
        ax.set_title(name)
        ax.set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()
