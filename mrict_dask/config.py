"""Pipeline configuration: one frozen dataclass tree, loadable from YAML/TOML, recorded in the store attrs.

Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class PlanConfig:
    max_days: int = 183
    pair_all: bool = False  # every admissible MR/CT session pair per patient, not only the closest
    session_hours: float = 12.0  # studies of one modality on one date, or this close in time: one session
    split_ratios: tuple[float, float, float] = (0.70, 0.15, 0.15)
    # MR: what counts as T1-weighted, as SeriesDescription/SequenceName regexes (case-insensitive; sequence tags
    # count too). With several, an earlier one ranks first, after contrast (see mrict_dask/selection.py).
    mr_prefer: tuple[str, ...] = (r"t1|mp-?rage|spgr|bravo|tfe|flash|fl3d|vibe|tfl",)
    mr_reject: tuple[str, ...] = (r"(?<![a-z])(loc|scout|survey|localizer|dwi|adc|perfusion|dti|swi|calibration|"
                                  r"asset|prescan|sense[\s_-]?ref\w*|coil[\s_-]?survey)(?![a-z])",)
    ct_reject: tuple[str, ...] = (r"(?<![a-z])(scout|topo|topogram|localizer|mip|"
                                  r"dose[\s_-]?(report|info\w*))(?![a-z])",)
    gap_tolerance: float = 0.2  # relative deviation of slice spacing from its median that counts as a gap
    allow_gantry_tilt: bool = True  # tilted CT is resampled onto an orthogonal grid


def plan_config(config: Any) -> PlanConfig:
    """The plan section of a whole :class:`Config`, or a PlanConfig as it is; defaults for None."""
    if config is None:
        return PlanConfig()
    return getattr(config, "plan", config)


@dataclass(frozen=True)
class RegistrationConfig:
    mr_bins: int = 50
    ct_bins: int = 50
    working_spacing_mm: float = 2.0  # isotropic grid both registrations run on
    sampling_fraction: float = 0.05  # of the fixed-mask voxels on the working grid; same count every level
    shrink_factors: tuple[int, ...] = (4, 2, 1)  # of the working grid
    smoothing_sigmas_mm: tuple[float, ...] = (4.0, 2.0, 1.0)
    iterations: int = 200  # per level
    learning_rate: float = 1.0  # regular-step gradient descent (fine levels): first step, ~mm
    refine_at_template_resolution: bool = True  # MR -> template: a last level on the template's own grid
    ct_refine_mm: float = 1.5  # CT -> MR: a last level on this grid when both series are sampled finer (0: off)
    # CT -> MR: slices thicker than this (and than the working grid): a last level on that series' own slices (0: off)
    thick_slice_mm: float = 3.0
    seed: int = 20240521
    threads: int = 1  # ITK threads per task; the Dask worker's threads are the parallelism
    # The gate (mrict_dask/qa.py; validated both ways by benchmarks/bench_register.py)
    min_brain_overlap: float = 0.80  # Dice of the template brain vs the MR's brain; also of the MR and CT heads
    det_range: tuple[float, float] = (0.6, 1.6)  # plausible determinant of the MR affine
    min_template_correlation: float = 0.40  # T1 template vs the MR over the template brain
    max_local_gain: float = 0.0  # a nearby transform may fit at most this much better (relative MI)
    max_skin_mm: float = 1.5  # spread of the MR-to-CT skin distance


@dataclass(frozen=True)
class NormalizeConfig:
    mr_percentiles: tuple[float, float] = (1.0, 99.0)
    ct_mode: str = "window"  # "window" (fixed HU, default) or "percentile"
    ct_window: tuple[float, float] = (-1024.0, 3071.0)
    ct_percentiles: tuple[float, float] = (1.0, 99.0)
    min_brain_fraction: float = 0.05  # slice_ok: share of the slice that is template brain
    min_valid_fraction: float = 0.95  # slice_ok: share of that brain covered by both MR and CT


@dataclass(frozen=True)
class NativeConfig:
    """The MR's own patient frame (native space) beside the template space."""

    enabled: bool = True
    spacing_mm: float = 1.0  # isotropic
    # one box for every pair (x, y, z mm along the MR's patient axes): a head from the vertex to below the chin
    box_mm: tuple[float, float, float] = (192.0, 240.0, 224.0)
    # the box's centre, in template coordinates (LPS mm), mapped into each MR by its MR -> template affine: with
    # the default box, from 12 mm above the MNI152 brain's top (the scalp) to 100 mm below its base (the chin)
    centre_template_mm: tuple[float, float, float] = (0.0, 4.0, -12.0)


@dataclass(frozen=True)
class DefaceConfig:
    """Defacing (mrict_dask/masks.py): the face region below and in front of the template brain is emptied."""

    enabled: bool = True
    # measured on Colin27 (a real brain, whose temporal poles sit ~5 mm beyond the template's after the affine):
    # its brain + 2 mm stays out of the region, both eyes' 5 mm balls in
    margin_mm: float = 8.0  # the face starts this far below the brain's lowest point in each column
    protect_mm: float = 8.0  # never within this distance of the template brain
    front_mm: float = 30.0  # only in front of the coronal plane this far anterior of the template's y = 0


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
    # glibc: serve allocations below this many MiB from the heap and keep up to twice that free for reuse
    # (what a long-lived process converges to by itself). Dask's nanny starts workers with
    # MALLOC_TRIM_THRESHOLD_=65536, which pins every volume-sized buffer to a fresh mmap + page faults:
    # ~25 % slower pairs. 0 leaves the allocator as the process started.
    malloc_mmap_threshold_mib: int = 32
    # one writer at a time: the run's lease on the store lasts this long unless renewed (every quarter of it);
    # a crashed run's lease expires after it (at once on the same host, when its process is gone)
    lease_seconds: float = 120.0


@dataclass(frozen=True)
class Config:
    plan: PlanConfig = field(default_factory=PlanConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    native: NativeConfig = field(default_factory=NativeConfig)
    deface: DefaceConfig = field(default_factory=DefaceConfig)
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
        else:
            kwargs[name] = _typed(sub, default, value)
    return cls(**kwargs)


def _typed(where: str, default: Any, value: Any) -> Any:
    """``value`` checked against the type of the field's default (a wrong type fails here, not mid-run)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def bad(expected: str):
        return ConfigError(f"config key '{where}' must be {expected}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
    elif isinstance(default, float) or where == "grid.spacing":
        if value is None and default is None:
            return None
        if not number(value):
            raise bad("a number")
        return float(value)
    elif isinstance(default, str) or where.startswith("grid.template"):
        if not (isinstance(value, str) or (value is None and default is None)):
            raise bad("a string")
    elif isinstance(default, tuple) or where == "grid.pad_to":
        if value is None and default is None:
            return None
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        value = tuple(value)
        if default and all(isinstance(v, str) for v in default):
            if not all(isinstance(v, str) for v in value):
                raise bad("a list of strings")
            for v in value:
                try:
                    re.compile(v)
                except re.error as exc:
                    raise bad(f"a list of regular expressions ({exc})") from None
        elif not all(number(v) for v in value):
            raise bad("a list of numbers")
    return value


# (key, test, what it must be): values of the right type that would still fail mid-run
_RULES: tuple[tuple[str, Any, str], ...] = (
    ("plan.max_days", lambda v: v >= 0, "at least 0"),
    ("plan.session_hours", lambda v: v >= 0, "at least 0 (hours)"),
    ("plan.split_ratios", lambda v: len(v) == 3 and min(v) >= 0 and sum(v) > 0, "three shares >= 0 (train, val, test)"),
    ("plan.gap_tolerance", lambda v: v > 0, "> 0"),
    ("registration.mr_bins", lambda v: v >= 2, "at least 2"),
    ("registration.ct_bins", lambda v: v >= 2, "at least 2"),
    ("registration.working_spacing_mm", lambda v: v > 0, "> 0"),
    ("registration.sampling_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("registration.shrink_factors", lambda v: len(v) > 0 and all(int(f) == f >= 1 for f in v), "whole numbers >= 1"),
    ("registration.smoothing_sigmas_mm", lambda v: all(s >= 0 for s in v), "numbers >= 0"),
    ("registration.iterations", lambda v: v >= 1, "at least 1"),
    ("registration.ct_refine_mm", lambda v: v >= 0, "at least 0 (0: off)"),
    ("registration.thick_slice_mm", lambda v: v >= 0, "at least 0 (0: off)"),
    ("registration.learning_rate", lambda v: v > 0, "> 0"),
    ("registration.threads", lambda v: v >= 1, "at least 1"),
    ("registration.min_brain_overlap", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("registration.det_range", lambda v: len(v) == 2 and 0 < v[0] < v[1], "two numbers 0 < low < high"),
    ("registration.min_template_correlation", lambda v: -1 <= v <= 1, "in [-1, 1]"),
    ("registration.max_skin_mm", lambda v: v > 0, "> 0"),
    ("normalize.mr_percentiles", lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 100,
     "two numbers 0 <= low < high <= 100"),
    ("normalize.ct_mode", lambda v: v in ("window", "percentile"), "'window' or 'percentile'"),
    ("normalize.ct_window", lambda v: len(v) == 2 and v[0] < v[1], "two numbers low < high (HU)"),
    ("normalize.ct_percentiles", lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 100,
     "two numbers 0 <= low < high <= 100"),
    ("normalize.min_brain_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("normalize.min_valid_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("grid.spacing", lambda v: v is None or v > 0, "> 0"),
    ("native.spacing_mm", lambda v: v > 0, "> 0"),
    ("native.box_mm", lambda v: len(v) == 3 and min(v) > 0, "three sizes > 0 (x, y, z mm)"),
    ("native.centre_template_mm", lambda v: len(v) == 3, "three coordinates (x, y, z mm)"),
    ("deface.margin_mm", lambda v: v >= 0, "at least 0"),
    ("deface.protect_mm", lambda v: v >= 0, "at least 0"),
    ("grid.pad_to", lambda v: v is None or (len(v) == 2 and all(int(n) == n >= 1 for n in v)),
     "two whole numbers >= 1"),
    ("run.window", lambda v: v >= 0, "at least 0"),
    ("run.retries", lambda v: v >= 0, "at least 0"),
    ("run.scan_batch", lambda v: v >= 1, "at least 1"),
    ("run.malloc_mmap_threshold_mib", lambda v: 0 <= v <= 32, "in [0, 32] (glibc's ceiling)"),
    ("run.lease_seconds", lambda v: v >= 1, "at least 1 (seconds)"),
)


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _coerce(Config, data, "")
    for key, ok, what in _RULES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"config key '{key}' must be {what}, got {value!r}")
    if len(cfg.registration.shrink_factors) != len(cfg.registration.smoothing_sigmas_mm):
        raise ConfigError("config keys 'registration.shrink_factors' and 'registration.smoothing_sigmas_mm' "
                          "must have the same length (one per level)")
    return cfg


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

        from .io import Location

        Location.of(url, storage_options)  # an unknown URL scheme: one line naming it
        try:
            with fsspec.open(url, "rt", **(storage_options or {})) as fh:
                text = fh.read()
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {url}") from exc
        except (OSError, ValueError, UnicodeDecodeError) as exc:  # a folder, an unknown protocol, binary bytes
            raise ConfigError(f"cannot read config {url} ({type(exc).__name__})") from None
        try:
            data = _parse_text(text, url)
        except Exception as exc:  # parse errors of three formats
            raise ConfigError(f"cannot parse config {url}: {' '.join(str(exc).split())[:300]}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {url} must hold a mapping of sections (run, plan, ...), "
                              f"not a {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config section '{p}' must be a mapping, not a {type(node).__name__}")
        node[leaf] = value
    return config_from_dict(data)
