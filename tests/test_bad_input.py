"""Bad input at the command line: one clear error line naming the problem, no traceback, a non-zero exit.

Cheap by design: every case fails before any pair is registered (empty or junk inputs, refused stores,
refused options). Most cases run in-process through click's runner; a few run the real `mrict-dask`
executable, so what a user's terminal shows is checked too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mrict_dask.cli import main
from mrict_dask.testing import free_port as _free_port


def clear_error(res, *needles: str) -> str:
    """The one `error:` line of a failed command; asserts it is alone, names the problem, and nothing crashed."""
    assert res.exit_code != 0, res.output
    # click's runner catches any exception: only a deliberate exit (SystemExit) is a handled error
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    text = res.output
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith("error")]
    assert len(errors) == 1, text
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def invoke(*args: str):
    return CliRunner().invoke(main, ["-q", *args])


@pytest.fixture
def junk(tmp_path):
    """An input folder without a single DICOM file: scans in a second, plans zero pairs."""
    d = tmp_path / "junk"
    d.mkdir()
    (d / "notes.txt").write_text("not a DICOM file\n")
    return str(d)


# --------------------------------------------------------------------------------------------- inputs
def test_empty_input_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    clear_error(invoke("run", str(tmp_path / "empty"), str(tmp_path / "o.zarr"), "--executor", "serial"),
                "no files", str(tmp_path / "empty"))


def test_missing_local_input(tmp_path):
    missing = str(tmp_path / "does-not-exist")
    clear_error(invoke("run", missing, str(tmp_path / "o.zarr"), "--executor", "serial"), "not found", missing)
    clear_error(invoke("export-series", missing, "--all", str(tmp_path / "nii")), "not found")


def test_missing_catalog_for_plan(tmp_path):
    clear_error(invoke("plan", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "p.json")), "nope.parquet")


def test_missing_s3_prefix_and_bucket(s3, tmp_path):
    so = json.dumps(s3.storage_options)
    clear_error(invoke("run", s3.url("nothing-here"), str(tmp_path / "o.zarr"), "--executor", "serial",
                       "--storage-options", so), "not found", "nothing-here")
    line = clear_error(invoke("run", "s3://no-such-bucket-mrict/in", s3.url("o.zarr"), "--executor", "serial",
                              "--storage-options", so), "no-such-bucket-mrict")
    assert s3.storage_options["secret"] not in line


def test_empty_s3_prefix(s3, tmp_path):
    s3.fs().pipe_file(s3.url("other", "x"), b"x")  # the bucket holds something, the prefix nothing
    clear_error(invoke("run", s3.url("empty"), str(tmp_path / "o.zarr"), "--executor", "serial",
                       "--storage-options", json.dumps(s3.storage_options)), "empty")


def test_unreachable_storage_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    so = {"endpoint_url": f"http://127.0.0.1:{_free_port()}", "key": "k-id-123", "secret": "sEcReT-456",
          "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    line = clear_error(invoke("run", "s3://bucket/in", "s3://bucket/out.zarr", "--executor", "serial",
                              "--storage-options", json.dumps(so)), "not reachable")
    assert "sEcReT-456" not in line and "k-id-123" not in line


def test_misspelt_storage_option(tmp_path):
    """A key the S3 client does not know (it only surfaces when the session opens): one line naming it."""
    so = {"endpoint_urll": f"http://127.0.0.1:{_free_port()}", "key": "k-id-123", "secret": "sEcReT-456"}
    for cmd in (["scan", "s3://bucket/in", "--out", str(tmp_path / "c.parquet")],
                ["run", "s3://bucket/in", "s3://bucket/out.zarr", "--executor", "serial"]):
        line = clear_error(invoke(*cmd, "--storage-options", json.dumps(so)), "storage option 'endpoint_urll'")
        assert "sEcReT-456" not in line and "k-id-123" not in line


# --------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("text,needle", [
    ("{bad", "not valid JSON"),
    ('{"anon": true', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('"anon"', "must be a JSON object"),
])
def test_malformed_storage_options(junk, tmp_path, text, needle):
    for cmd in (["run", junk, str(tmp_path / "o.zarr"), "--executor", "serial"],
                ["plan", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "p.json")],
                ["verify", str(tmp_path / "o.zarr")]):
        clear_error(invoke(*cmd, "--storage-options", text), "--storage-options", needle)


@pytest.mark.parametrize("name,text,needles", [
    ("unknown.yaml", "plan:\n  max_dayz: 3\n", ("max_dayz", "plan")),
    ("unknown.toml", "[registrationn]\niterations = 3\n", ("registrationn",)),
    ("unknown.json", '{"run": {"retry": 1}}', ("retry",)),
    ("type.yaml", "plan:\n  max_days: soon\n", ("plan.max_days", "integer")),
    ("range.yaml", "grid:\n  spacing: -2\n", ("grid.spacing", "> 0")),
    ("choice.yaml", "normalize:\n  ct_mode: hu\n", ("normalize.ct_mode", "window")),
    ("order.yaml", "normalize:\n  mr_percentiles: [99, 1]\n", ("normalize.mr_percentiles",)),
    ("regex.yaml", "plan:\n  mr_reject: ['t1(']\n", ("plan.mr_reject", "regular expression")),
    ("section.yaml", "plan: 3\n", ("plan", "mapping")),
    ("list.yaml", "- 1\n- 2\n", ("mapping", "list")),
    ("broken.yaml", "plan: [1, 2\n", ("cannot parse", "broken.yaml")),
    ("broken.toml", "[plan\nmax_days = 3\n", ("cannot parse", "broken.toml")),
])
def test_bad_config_file(junk, tmp_path, name, text, needles):
    cfg = tmp_path / name
    cfg.write_text(text)
    out = tmp_path / "o.zarr"
    clear_error(invoke("run", junk, str(out), "--executor", "serial", "--config", str(cfg)), *needles)
    assert not out.exists()  # refused before anything was written to the output


def test_bad_numeric_options(junk, tmp_path):
    out = str(tmp_path / "o.zarr")
    clear_error(invoke("run", junk, out, "--executor", "serial", "--grid-spacing", "0"), "grid.spacing")
    clear_error(invoke("run", junk, out, "--executor", "serial", "--max-days", "-5"), "plan.max_days")
    clear_error(invoke("run", junk, out, "--memory-limit", "lots"), "--memory-limit", "lots")
    res = invoke("run", junk, out, "--executor", "serial", "--limit", "-1")  # click's own usage error
    assert res.exit_code == 2 and "--limit" in res.output and "Traceback" not in res.output


def test_negative_limit_refused_by_the_library(junk, tmp_path):
    from mrict_dask.errors import ConfigError
    from mrict_dask.orchestrate import run_pipeline

    with pytest.raises(ConfigError, match="limit"):
        run_pipeline(junk, str(tmp_path / "o.zarr"), executor="serial", limit=-1, pseudonym_key="k")


# --------------------------------------------------------------------------------------------- outputs
def test_output_holding_a_store_of_patients_the_input_does_not_hold(junk, tmp_path):
    """A store made for a one-pair plan; a run over an input that holds none of its patients (an export of other
    patients) keeps that pair, and says so: a store never loses a pair because an input left it out."""
    from mrict_dask.config import Config
    from mrict_dask.store import open_or_create_store, pair_table
    from mrict_dask.template import template_from_config
    from mrict_dask.types import PairSpec

    out = tmp_path / "o.zarr"
    pair = PairSpec(index=0, pair_id="P0000000000000000-0001", patient="P0000000000000000", split="train",
                    days_apart=3, mr_files=("mr",), ct_files=("ct",))
    open_or_create_store(str(out), [pair], template_from_config(Config().grid), Config())
    res = invoke("run", junk, str(out), "--executor", "serial", "--pseudonym-key", "k")
    assert res.exit_code == 0 and "1 kept although their patient is no longer in the input" in res.output, res.output
    assert pair_table(str(out))["pair"] == [pair.pair_id]


def test_output_holding_a_store_with_another_config(junk, tmp_path):
    out = str(tmp_path / "o.zarr")
    res = invoke("run", junk, out, "--executor", "serial", "--pseudonym-key", "k")
    assert res.exit_code == 0, res.output
    clear_error(invoke("run", junk, out, "--executor", "serial", "--pseudonym-key", "k", "--grid-spacing", "2"),
                "different store", "grid.spacing")
    res = invoke("run", junk, out, "--executor", "serial", "--pseudonym-key", "k")  # the same run resumes
    assert res.exit_code == 0, res.output


def test_output_holding_something_else(junk, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    clear_error(invoke("run", junk, str(foreign), "--executor", "serial"), "not an mrict-dask store")
    assert os.listdir(foreign) == ["holiday.jpg"]
    a_file = tmp_path / "report.pdf"
    a_file.write_bytes(b"%PDF")
    clear_error(invoke("run", junk, str(a_file), "--executor", "serial"), "not an mrict-dask store")
    assert a_file.read_bytes() == b"%PDF"
    other_zarr = tmp_path / "other.zarr"
    other_zarr.mkdir()
    (other_zarr / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    clear_error(invoke("run", junk, str(other_zarr), "--executor", "serial"), "not an mrict-dask store")


def test_output_on_s3_holding_a_different_store(junk, s3):
    so = json.dumps(s3.storage_options)
    out = s3.url("o.zarr")
    assert invoke("run", junk, out, "--executor", "serial", "--pseudonym-key", "k", "--storage-options",
                  so).exit_code == 0
    clear_error(invoke("run", junk, out, "--executor", "serial", "--pseudonym-key", "k", "--grid-spacing", "2",
                       "--storage-options", so), "different store")


def test_verify_and_inspect_something_that_is_not_a_store(junk, tmp_path):
    clear_error(invoke("verify", str(tmp_path / "nothing.zarr")), "nothing.zarr")
    clear_error(invoke("inspect", junk), "junk")


# --------------------------------------------------------------------------------------------- real process
def _exe() -> list[str]:
    exe = shutil.which("mrict-dask") or os.path.join(os.path.dirname(sys.executable), "mrict-dask")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "mrict_dask.cli"]


@pytest.mark.parametrize("case", ["empty", "missing", "storage-options", "config", "store"])
def test_real_process_prints_one_line_and_exits_non_zero(case, junk, tmp_path):
    out = tmp_path / "o.zarr"
    args = ["run", junk, str(out), "--executor", "serial", "--pseudonym-key", "k"]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        args[1], needle = str(tmp_path / "empty"), "no files"
    elif case == "missing":
        args[1], needle = str(tmp_path / "missing"), "not found"
    elif case == "storage-options":
        args += ["--storage-options", "{oops"]
        needle = "--storage-options"
    elif case == "config":
        (tmp_path / "c.yaml").write_text("plan:\n  max_dayz: 3\n")
        args += ["--config", str(tmp_path / "c.yaml")]
        needle = "max_dayz"
    else:
        (out / "zarr.json").parent.mkdir()
        (out / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
        needle = "not an mrict-dask store"
    proc = subprocess.run(_exe() + ["-q"] + args, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


# --------------------------------------------------------------------------------------------- every command
def _sweep_cases(tmp_path, junk) -> list[tuple[list[str], tuple[str, ...]]]:
    """(command line, words the one error line must hold) for bad URLs, schedulers, catalogs and counts."""
    not_parquet = tmp_path / "catalog.parquet"
    not_parquet.write_text("url,series_uid\nnot,parquet\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    mistyped = tmp_path / "mistyped.parquet"  # a column of another type: named, its values not quoted
    pq.write_table(pa.table({"url": ["a", "b"], "series_uid": ["1", "2"], "image_type": [[7001], [7002]]}),
                   str(mistyped))
    dead = f"tcp://127.0.0.1:{_free_port()}"
    out = str(tmp_path / "o.zarr")
    cases: list[tuple[list[str], tuple[str, ...]]] = []
    for command in (["scan", "{url}", "--out", str(tmp_path / "c.parquet")], ["run", "{url}", out],
                    ["export-series", "{url}", "--all", str(tmp_path / "x")], ["plan", "{url}", "--out", "p.json"],
                    ["inspect", "{url}"], ["verify", "{url}"], ["synth", "{url}"]):
        args = [a.replace("{url}", "foo://bucket/data") for a in command]
        cases.append((args, ("foo://",)))
    cases += [
        (["scan", junk, "--out", str(tmp_path / "c.parquet"), "--scheduler", dead], ("scheduler", dead)),
        (["run", junk, out, "--scheduler", dead], ("scheduler", dead)),
        (["scan", junk, "--out", str(tmp_path / "c.parquet"), "--scheduler", "foo://host:1"],
         ("not a Dask scheduler address", "foo://host:1")),
        (["run", junk, out, "--scheduler", "tls://127.0.0.1:1"], ("tls://", "TLS settings")),
        (["run", junk, out, "--config", str(tmp_path)], ("cannot read config",)),
        (["run", junk, out, "--config", "foo://c.yaml"], ("unknown URL scheme", "foo://c.yaml")),
        (["plan", str(not_parquet), "--out", str(tmp_path / "p.json")], ("not a readable Parquet catalog",)),
        (["plan", str(tmp_path), "--out", str(tmp_path / "p.json")], ("folder",)),
        (["plan", str(mistyped), "--out", str(tmp_path / "p.json")], ("column image_type has type",)),
        (["export-series", junk, "--all", str(tmp_path / "x"), "--catalog", str(not_parquet)], ("Parquet",)),
        (["run", junk, out, "--workers", "0"], ("--workers", "0")),
        (["scan", junk, "--out", str(tmp_path / "c.parquet"), "--workers", "-1"], ("--workers",)),
        (["scan", junk, "--out", str(tmp_path / "c.parquet"), "--batch-size", "0"], ("--batch-size",)),
        (["run", junk, out, "--threads-per-worker", "0"], ("--threads-per-worker",)),
        (["synth", str(tmp_path / "s"), "--patients", "0"], ("--patients",)),
        (["demo", "--dir", str(tmp_path / "d"), "--workers", "0"], ("--workers",)),
        (["run", "dicomweb+http://127.0.0.1:1/dicom-web", out, "--work", "dicomweb+http://127.0.0.1:1/w"],
         ("DICOMweb",)),
    ]
    return cases


def test_every_command_refuses_bad_urls_schedulers_catalogs_and_counts_in_one_line(junk, tmp_path, monkeypatch):
    import mrict_dask.orchestrate as orchestrate

    monkeypatch.setattr(orchestrate, "SCHEDULER_TIMEOUT_S", 2)  # a dead address: do not wait the default
    seen = set()
    for args, needles in _sweep_cases(tmp_path, junk):
        line = clear_error(invoke(*args), *needles)
        seen.add(args[0])
        assert "foo://" not in line or "unknown URL scheme" in line or "scheduler" in line, line
    assert seen == {"scan", "run", "export-series", "plan", "inspect", "verify", "synth", "demo"}


@pytest.mark.parametrize("url", ["https://reader:Secret-pw7@127.0.0.1:1/dicom/",
                                 "s3://AKIAKEY:Secret-pw7@bucket/dicom",
                                 "dicomweb+http://reader:pa/Secret-pw7@127.0.0.1:1/dicom-web",
                                 "simplecache::https://reader:Secret-pw7@127.0.0.1:1/x"])
def test_credentials_in_a_url_are_refused_without_being_repeated(url, tmp_path):
    """URLs are logged and kept in the catalog and plan: one holding a user name and password is refused, and
    the error line does not repeat it."""
    out = str(tmp_path / "o.zarr")
    for args in (["scan", url, "--out", str(tmp_path / "c.parquet")], ["run", url, out],
                 ["export-series", url, "--all", str(tmp_path / "x")]):
        line = clear_error(invoke(*args), "credentials")
        assert "Secret-pw7" not in line, line
    line = clear_error(invoke("run", str(tmp_path), url.replace("/dicom", "/store.zarr")), "credentials")
    assert "Secret-pw7" not in line and not os.path.exists(out)
