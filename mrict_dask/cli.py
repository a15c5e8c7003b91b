"""The `mrict-dask` command line. Thin: parse options, call one function of the library, print.

Heavy imports (SimpleITK, dask, zarr, pydicom) happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import click

from . import __version__

log = logging.getLogger("mrict_dask")


def _setup_logging(verbose: int, quiet: bool) -> None:
    # distributed configures its own loggers (INFO) when imported, later and in every worker process: tell it
    # through its config, which the environment carries to the LocalCluster's workers too.
    import os

    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    level = logging.DEBUG if verbose > 1 else (logging.INFO if verbose == 1 and not quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Third-party loggers stay at WARNING at every verbosity: botocore/s3fs debug output carries request
    # headers (access key ids), and distributed's carries task arguments (file URLs that may name patients).
    # dicomweb_client logs the UIDs it fetches at INFO.
    for name in ("distributed", "asyncio", "botocore", "boto3", "s3fs", "aiobotocore", "urllib3", "fsspec",
                 "numcodecs", "matplotlib", "PIL", "dicomweb_client", "requests"):
        logging.getLogger(name).setLevel(logging.WARNING)


_STORAGE_MODULES = {"fsspec", "s3fs", "gcsfs", "adlfs", "aiobotocore", "botocore"}


class _Group(click.Group):
    """Turns our own errors into one clear line and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from .errors import MrictError

        try:
            return super().invoke(ctx)
        except MrictError as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(2)
        except FileNotFoundError as err:
            click.secho(f"error: not found: {err.filename or err}", fg="red", err=True)
            sys.exit(2)
        except PermissionError as err:
            click.secho(f"error: permission denied: {err.filename or err}", fg="red", err=True)
            sys.exit(2)
        except TypeError as err:
            # a misspelt --storage-options key only surfaces when the filesystem opens its session
            words = re.match(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(err))
            tb = err.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
            if not words or where.split(".")[0] not in _STORAGE_MODULES:
                raise
            click.secho(f"error: storage option '{words.group(2)}' is not one the storage client accepts "
                        f"({words.group(1)}); check --storage-options", fg="red", err=True)
            sys.exit(2)
        except Exception as err:
            # storage unreachable after the client's own retries: the user needs the reason, not a traceback
            if not (isinstance(err, (ConnectionError, TimeoutError, OSError))
                    or type(err).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp")):
                raise
            from .executor import mask_paths

            # s3fs turns 5xx answers that outlast its retries into OSError(EIO/EBUSY)
            reason = mask_paths(str(err).splitlines()[0][:300]) if str(err) else ""
            click.secho(f"error: storage not reachable or failing: {type(err).__name__}: {reason}", fg="red",
                        err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mrict-dask")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only; no progress bars.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Paired brain MRI/CT DICOM -> registered, normalized, chunked Zarr, on any Dask cluster."""
    _setup_logging(verbose, quiet)
    ctx.ensure_object(dict)
    ctx.obj["progress"] = not quiet


storage_opt = click.option(
    "--storage-options", default=None, metavar="JSON",
    help='fsspec storage options as JSON, e.g. \'{"anon": true}\' or \'{"client_kwargs": {"endpoint_url": "..."}}\'.',
)
cluster_opts = [
    click.option("--scheduler", default=None, metavar="ADDR", help="Address of a running Dask scheduler."),
    click.option("--workers", type=click.IntRange(min=1), default=None,
                 help="LocalCluster workers (default: sized to the machine)."),
]


def _apply(opts):
    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


@main.command()
@click.argument("out_url")
@click.option("--patients", type=click.IntRange(min=1), default=3, show_default=True,
              help="Number of synthetic patients.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quirks", default="", metavar="LIST|all",
              help="Comma-separated quirk switches, or 'all': broken files (`mrict_dask.synth.QUIRKS`) and "
                   "clinical layouts (`mrict_dask.synth.LAYOUT_QUIRKS`: study_per_sequence, sagittal_t1, coronal_t1, "
                   "contrast_tag_only, perfusion, dti, secondary_capture, rtstruct, ct_reformat, ct_bone, ct_thick, "
                   "ct_scout; fields of view: sagittal_t1_neck, axial_t1_brain, off_centre_t1, ct_face_neck).")
@click.option("--layout", type=click.Choice(["tcia", "flat"]), default="tcia", show_default=True,
              help="tcia: patient/study/series/1-001.dcm; flat: one folder, shuffled extension-less names.")
@click.option("--manifest", default=None, metavar="URL", help="Where to write the ground-truth manifest "
              "(default: OUT_URL + '.manifest.json', beside the corpus).")
@storage_opt
@click.pass_context
def synth(ctx, out_url, patients, seed, quirks, layout, manifest, storage_options):
    """Generate a synthetic brain MR/CT DICOM corpus with a ground-truth manifest."""
    from .io import parse_storage_options
    from .synth import generate_corpus, parse_quirks

    so = parse_storage_options(storage_options)
    summary = generate_corpus(out_url, patients=patients, seed=seed, quirks=parse_quirks(quirks), layout=layout,
                              manifest_url=manifest, storage_options=so, progress=ctx.obj["progress"])
    click.echo(summary.describe())


@main.command()
@click.argument("input_url")
@click.option("--out", "out", required=True, metavar="CATALOG.parquet", help="Where to write the catalog (private).")
@_apply(cluster_opts)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Files per task.")
@storage_opt
@click.pass_context
def scan(ctx, input_url, out, scheduler, workers, batch_size, storage_options):
    """List DICOM under INPUT_URL and read headers only into a Parquet catalog."""
    from .io import Location, parse_storage_options
    from .orchestrate import as_executor, client_for
    from .scan import scan_to_parquet
    from .sources import open_source

    so = parse_storage_options(storage_options)
    source, dest = open_source(input_url, so), Location(out)  # refuse unusable URLs before starting a cluster
    with client_for(scheduler, workers) as client:
        summary = scan_to_parquet(source, dest.url, executor=as_executor(client), batch_size=batch_size,
                                  progress=ctx.obj["progress"])
    click.echo(summary.describe())


@main.command()
@click.argument("catalog")
@click.option("--out", "out", required=True, metavar="plan.json", help="Where to write the plan (private).")
@click.option("--config", "config_url", default=None, help="Pipeline config (YAML/TOML).")
@click.option("--max-days", type=int, default=None, help="Largest MR/CT gap in days (default 183).")
@click.option("--pair-all", is_flag=True, default=None, help="Keep every admissible pair, not only the closest.")
@click.option("--pseudonym-key", default=None, envvar="MRICT_PSEUDONYM_KEY", show_envvar=True,
              help="Key for patient pseudonyms.")
@storage_opt
def plan(catalog, out, config_url, max_days, pair_all, pseudonym_key, storage_options):
    """Group series into volumes, select MR/CT series, pair studies and split by patient."""
    from .config import load_config
    from .io import parse_storage_options
    from .plan import plan_to_json

    so = parse_storage_options(storage_options)
    cfg = load_config(config_url, {"plan.max_days": max_days, "plan.pair_all": pair_all})
    summary = plan_to_json(catalog, out, cfg, pseudonym_key=pseudonym_key, storage_options=so)
    click.echo(summary.describe())


@main.command("export-series")
@click.argument("input_url")
@click.option("--series", "series_uid", default=None, help="SeriesInstanceUID to export.")
@click.option("--out", "out", default=None, help="Output file (.nii.gz / .nrrd / .mha).")
@click.option("--all", "all_dir", default=None, metavar="OUTDIR", help="Export every usable series into OUTDIR.")
@click.option("--catalog", default=None, help="Reuse an existing catalog instead of scanning INPUT_URL.")
@storage_opt
@click.pass_context
def export_series(ctx, input_url, series_uid, out, all_dir, catalog, storage_options):
    """Write series as NIfTI volumes (LPS geometry kept), like dcm2niix."""
    from .export import export_series_command
    from .io import parse_storage_options

    if not all_dir and not (series_uid and out):
        raise click.UsageError("give --series UID --out FILE, or --all OUTDIR")
    so = parse_storage_options(storage_options)
    summary = export_series_command(input_url, series_uid=series_uid, out=out, all_dir=all_dir, catalog=catalog,
                                    storage_options=so, progress=ctx.obj["progress"])
    click.echo(summary.describe())


@main.command()
@click.argument("input_url")
@click.argument("output_url")
@click.option("--work", "work_url", default=None, help="Private work area (catalog, plan, key). "
              "Default: OUTPUT_URL + '.work'.")
@_apply(cluster_opts)
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--memory-limit", default="auto", show_default=True, help="Per LocalCluster worker, e.g. 4GiB.")
@click.option("--executor", type=click.Choice(["dask", "serial"]), default="dask", show_default=True,
              help="serial: a plain loop in this process (debugging, reference).")
@click.option("--config", "config_url", default=None, help="Pipeline config (YAML/TOML).")
@click.option("--limit", type=click.IntRange(min=0), default=None,
              help="Process only the first N pairs (a cheap trial).")
@click.option("--max-days", type=int, default=None, help="Largest MR/CT gap in days (default 183).")
@click.option("--template", default=None, help="Template image path/URL (default: MNI152 from nilearn).")
@click.option("--grid-spacing", type=float, default=None, help="Output grid spacing in mm (default: template's).")
@click.option("--pseudonym-key", default=None, envvar="MRICT_PSEUDONYM_KEY", show_envvar=True,
              help="Key for patient pseudonyms.")
@storage_opt
@click.pass_context
def run(ctx, input_url, output_url, work_url, scheduler, workers, threads_per_worker, memory_limit, executor,
        config_url, limit, max_days, template, grid_spacing, pseudonym_key, storage_options):
    """Scan -> plan -> register/normalize each pair on the workers -> Zarr store + report."""
    from .config import load_config
    from .io import parse_storage_options
    from .orchestrate import ClusterSpec, run_pipeline

    so = parse_storage_options(storage_options)
    if memory_limit != "auto":
        from dask.utils import parse_bytes

        from .errors import ConfigError

        try:
            parse_bytes(memory_limit)
        except ValueError:
            raise ConfigError(f"--memory-limit {memory_limit!r} is not a size (e.g. 4GiB, 500MB, or auto)") from None
    cfg = load_config(config_url, {"plan.max_days": max_days, "grid.template": template,
                                   "grid.spacing": grid_spacing}, storage_options=so)
    cluster = ClusterSpec(scheduler, workers, threads_per_worker, memory_limit)
    summary = run_pipeline(input_url, output_url, work_url=work_url, config=cfg, executor=executor, cluster=cluster,
                           limit=limit, pseudonym_key=pseudonym_key, storage_options=so, progress=ctx.obj["progress"])
    click.echo(summary.describe())
    if summary.exit_code:
        sys.exit(summary.exit_code)


@main.command()
@click.option("--dir", "base", default="./mrict-demo", show_default=True, help="Where to put corpus, store, report.")
@click.option("--patients", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=None)
@click.pass_context
def demo(ctx, base, patients, workers):
    """The embedded default: synthetic corpus -> LocalCluster run -> local store, summary and a training batch."""
    from .orchestrate import run_demo

    run_demo(base, patients=patients, workers=workers, progress=ctx.obj["progress"], echo=click.echo)


def _fanout(scheduler: str | None, workers: int | None):
    """Where export and evaluate run their per-pair tasks: on a Dask cluster when given a scheduler or a number of
    LocalCluster workers, else in a loop in this process."""
    from .orchestrate import ClusterSpec, open_executor

    if scheduler or workers:
        return open_executor("dask", ClusterSpec(scheduler, workers))
    return open_executor("serial", retries=1)


def _pair_list(text: str | None) -> list[str] | None:
    """``--pairs``: ids separated by commas, or ``@FILE`` with one id per line."""
    if not text:
        return None
    if text.startswith("@"):
        from .io import Location

        text = Location(text[1:]).read_text().replace("\n", ",")
    return [p.strip() for p in text.split(",") if p.strip()] or None


def _report_errors(lines: list[str]) -> None:
    for line in lines:
        click.secho(f"error: {line}", fg="red", err=True)


space_opt = click.option("--space", type=click.Choice(["native", "template"]), default=None,
                         help="Which space of the store (default: native when the store has it, else template).")
selection_opts = [
    click.option("--split", default=None, metavar="train|val|test", help="Only the pairs of this split."),
    click.option("--pairs", "pair_ids", default=None, metavar="ID,ID,...|@FILE",
                 help="Only these pair ids (comma-separated, or a file with one per line)."),
    click.option("--version", "version", type=click.IntRange(min=1), default=None, metavar="N",
                 help="The pairs of this store version (default: the latest; `mrict-dask inspect` lists them)."),
]


@main.command("export")
@click.argument("store_url")
@click.argument("out_url")
@space_opt
@_apply(selection_opts)
@click.option("--format", "fmt", type=click.Choice(["nii.gz", "mha"]), default="nii.gz", show_default=True)
@_apply(cluster_opts)
@storage_opt
@click.pass_context
def export_cases(ctx, store_url, out_url, space, split, pair_ids, version, fmt, scheduler, workers, storage_options):
    """Write the store's ok pairs as case folders (OUT/<pair>/mr, ct in HU, mask) with an overview."""
    from .cases import export_store
    from .io import parse_storage_options

    so = parse_storage_options(storage_options)
    with _fanout(scheduler, workers) as ex:
        summary = export_store(store_url, out_url, space=space, fmt=fmt, split=split, pairs=_pair_list(pair_ids),
                               version=version, executor=ex, storage_options=so, progress=ctx.obj["progress"])
    click.echo(summary.describe())
    _report_errors(summary.errors())
    sys.exit(summary.exit_code)


@main.command()
@click.argument("store_url")
@click.argument("predictions_url")
@space_opt
@_apply(selection_opts)
@click.option("--out", "out_url", default=None, metavar="DIR",
              help="Where metrics.csv and metrics.json go (default: PREDICTIONS + '-evaluation').")
@click.option("--tissue-hu", default="-200,300", show_default=True, metavar="LO,HI",
              help="Reference HU that separate air | soft tissue | bone for the MAE by tissue class.")
@_apply(cluster_opts)
@storage_opt
@click.pass_context
def evaluate(ctx, store_url, predictions_url, space, split, pair_ids, version, out_url, tissue_hu, scheduler,
             workers, storage_options):
    """Score synthetic CTs (a Zarr with 'sct', or the export's folders with sct.nii.gz/.mha) against the store's CT."""
    from .errors import ConfigError
    from .evaluate import evaluate_store
    from .io import parse_storage_options

    try:
        thresholds = tuple(float(v) for v in tissue_hu.split(","))
    except ValueError:
        thresholds = ()
    if len(thresholds) != 2:
        raise ConfigError(f"--tissue-hu takes two numbers LO,HI, got {tissue_hu!r}")
    so = parse_storage_options(storage_options)
    with _fanout(scheduler, workers) as ex:
        result = evaluate_store(store_url, predictions_url, space=space, split=split, pairs=_pair_list(pair_ids),
                                version=version, tissue_hu=thresholds, out_url=out_url, executor=ex, storage_options=so,
                                progress=ctx.obj["progress"])
    click.echo(result.describe())
    _report_errors(result.error_lines())
    sys.exit(result.exit_code)


@main.command("to-dicom")
@click.argument("sct_url")
@click.option("--pair", "pair_id", required=True, help="The pair id the synthetic CT belongs to.")
@click.option("--store", "store_url", required=True, help="The store (with native space).")
@click.option("--work", "work_url", default=None, help="The private work area of the run that made the store "
              "(default: STORE + '.work').")
@click.option("--out", "out_url", required=True, metavar="DIR", help="Folder for the DICOM files (hospital side).")
@click.option("--series-number", type=click.IntRange(min=0), default=9901, show_default=True)
@storage_opt
def to_dicom(sct_url, pair_id, store_url, work_url, out_url, series_number, storage_options):
    """Write a native-space synthetic CT as a DICOM CT series in the MR's study and frame of reference."""
    from .io import parse_storage_options
    from .sct_dicom import write_sct_dicom

    summary = write_sct_dicom(sct_url, pair_id, store_url, out_url, work_url=work_url,
                              storage_options=parse_storage_options(storage_options), series_number=series_number)
    click.echo(summary.describe())


@main.command()
@click.argument("store_url")
@click.option("--png", default=None, metavar="FILE", help="Write a montage of random slice pairs.")
@storage_opt
def inspect(store_url, png, storage_options):
    """Summarise a store: pairs, splits, usable slices, failures by reason, QA metrics."""
    from .io import parse_storage_options
    from .store import inspect_store

    click.echo(inspect_store(store_url, png=png, storage_options=parse_storage_options(storage_options)))


@main.command()
@click.argument("store_url")
@click.argument("patients", nargs=-1, required=True)
@click.option("--work", "work_url", default=None, help="Private work area: its plan resolves PatientIDs, and the "
              "withdrawal list lives there. Default: STORE_URL + '.work'.")
@click.option("--pseudonym-key", default=None, envvar="MRICT_PSEUDONYM_KEY", show_envvar=True,
              help="Key for patient pseudonyms (to resolve a PatientID the work area's plan does not hold).")
@storage_opt
def forget(store_url, patients, work_url, pseudonym_key, storage_options):
    """Withdraw PATIENTS (pseudonyms, or PatientIDs resolved through the private work area) from a store: their
    pairs' data is deleted, versions that held them can no longer be served, no later run adds them back."""
    from .growth import forget as forget_patients
    from .io import parse_storage_options

    summary = forget_patients(store_url, list(patients), work_url=work_url, pseudonym_key=pseudonym_key,
                              storage_options=parse_storage_options(storage_options))
    click.echo(summary.describe())


@main.command()
@click.argument("store_url")
@storage_opt
def verify(store_url, storage_options):
    """Recompute every pair's checksum; report torn or corrupted pairs (exit 1 if any)."""
    from .io import parse_storage_options
    from .store import verify_store

    report = verify_store(store_url, storage_options=parse_storage_options(storage_options))
    click.echo(report.describe())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
