"""Pipeline configuration: one frozen dataclass tree, loadable from YAML/TOML, recorded in the store attrs.

Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class PlanConfig:
    max_days: int = 183
    pair_all: bool = False  # every admissible MR/CT study pair per patient, not only the closest
    split_ratios: tuple[float, float, float] = (0.70, 0.15, 0.15)
    # MR series selection: SeriesDescription regexes tried in order (first match class wins),
    # then thinner slices. Case-insensitive.
    mr_prefer: tuple[str, ...] = (r"t1.*(post|\+c|gd|contrast|ce\b|mprage.*post)", r"t1", r"mprage|spgr|bravo|tfe")
    mr_reject: tuple[str, ...] = (r"loc|scout|survey|localizer|dwi|adc|perfusion|dti|swi",)
    ct_reject: tuple[str, ...] = (r"scout|topo|localizer|bone|lung|dose|mip",)
    gap_tolerance: float = 0.2  # relative deviation of slice spacing from its median that counts as a gap
    allow_gantry_tilt: bool = True  # tilted CT is resampled onto an orthogonal grid


@dataclass(frozen=True)
class RegistrationConfig:
    mr_bins: int = 50
    ct_bins: int = 50
    working_spacing_mm: float = 2.0  # isotropic grid both registrations run on
    sampling_fraction: float = 0.05  # of the fixed-mask voxels on the working grid; same count every level
    shrink_factors: tuple[int, ...] = (4, 2, 1)  # of the working grid
    smoothing_sigmas_mm: tuple[float, ...] = (4.0, 2.0, 1.0)
    iterations: int = 200  # per level
    learning_rate: float = 2.0  # regular-step gradient descent: first step, ~mm (scales from physical shift)
    seed: int = 20240521
    threads: int = 1  # ITK threads per task; the Dask worker's threads are the parallelism
    min_brain_overlap: float = 0.80  # Dice of template brain mask vs MR head-derived check
    det_range: tuple[float, float] = (0.6, 1.6)  # plausible determinant of the MR affine


@dataclass(frozen=True)
class NormalizeConfig:
    mr_percentiles: tuple[float, float] = (1.0, 99.0)
    ct_mode: str = "window"  # "window" (fixed HU, default) or "percentile"
    ct_window: tuple[float, float] = (-1024.0, 3071.0)
    ct_percentiles: tuple[float, float] = (1.0, 99.0)
    min_brain_fraction: float = 0.05  # slice_ok: share of the slice that is template brain
    min_valid_fraction: float = 0.95  # slice_ok: share of that brain covered by both MR and CT


@dataclass(frozen=True)
class GridConfig:
    template: str | None = None  # None: MNI152 2009 1 mm T1 shipped in nilearn; else a path or fsspec URL
    template_mask: str | None = None
    spacing: float | None = None  # e.g. 2.0 for a coarser output grid
    pad_to: tuple[int, int] | None = None  # fixed in-plane (y, x) size, e.g. (256, 256)


@dataclass(frozen=True)
class RunConfig:
    window: int = 0  # in-flight pairs; 0 = 2 x total worker threads
    retries: int = 2
    scan_batch: int = 256


@dataclass(frozen=True)
class Config:
    plan: PlanConfig = field(default_factory=PlanConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _coerce(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) in '{where}': {', '.join(unknown)} (known: {', '.join(sorted(fields))})"
        )
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        sub = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            kwargs[name] = _coerce(type(default), value, sub)
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _coerce(Config, data, "")


def _parse_text(text: str, name: str) -> dict[str, Any]:
    if name.endswith(".toml"):
        import tomllib

        return tomllib.loads(text)
    if name.endswith(".json"):
        return json.loads(text)
    import yaml

    data = yaml.safe_load(text)
    return {} if data is None else data


def load_config(url: str | None = None, overrides: dict[str, Any] | None = None,
                storage_options: dict | None = None) -> Config:
    """Load a YAML/TOML/JSON config (path or fsspec URL), then apply dotted ``overrides`` ({"plan.max_days": 90})."""
    data: dict[str, Any] = {}
    if url:
        import fsspec

        try:
            with fsspec.open(url, "rt", **(storage_options or {})) as fh:
                text = fh.read()
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {url}") from exc
        try:
            data = _parse_text(text, url)
        except Exception as exc:  # parse errors of three formats
            raise ConfigError(f"cannot parse config {url}: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(data)
