"""Configuration: defaults, files, overrides, and one clear error for a bad key."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mrict_dask.cli import main
from mrict_dask.config import Config, config_from_dict, load_config
from mrict_dask.errors import ConfigError


def test_defaults_match_the_contract():
    cfg = Config()
    assert cfg.plan.max_days == 183
    assert cfg.normalize.ct_window == (-1024.0, 3071.0)
    assert cfg.normalize.mr_percentiles == (1.0, 99.0)
    assert cfg.registration.threads == 1


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "plan:\n  max_days: 90\nnormalize:\n  ct_window: [-100, 200]\n"),
    (".toml", "[plan]\nmax_days = 90\n[normalize]\nct_window = [-100, 200]\n"),
])
def test_file_formats(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    cfg = load_config(str(path))
    assert cfg.plan.max_days == 90
    assert cfg.normalize.ct_window == (-100, 200)
    assert cfg.registration == Config().registration


def test_overrides_win_and_none_is_ignored(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("plan:\n  max_days: 90\n")
    cfg = load_config(str(path), {"plan.max_days": 30, "grid.spacing": None})
    assert cfg.plan.max_days == 30 and cfg.grid.spacing is None


def test_round_trip_through_dict():
    cfg = load_config(None, {"grid.spacing": 2.0, "plan.pair_all": True})
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("data,needle", [
    ({"plan": {"max_dayz": 3}}, "max_dayz"),
    ({"registrationn": {}}, "registrationn"),
    ({"plan": 3}, "plan"),
])
def test_unknown_or_malformed_keys_are_errors(data, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(data)


def test_cli_reports_bad_config_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("plan:\n  max_dayz: 3\n")
    (tmp_path / "in").mkdir()
    res = CliRunner().invoke(main, ["run", str(tmp_path / "in"), str(tmp_path / "out.zarr"), "--config", str(path)])
    assert res.exit_code != 0
    assert "max_dayz" in res.output and "Traceback" not in res.output


def test_cli_reports_missing_config_file(tmp_path):
    res = CliRunner().invoke(main, ["run", str(tmp_path), str(tmp_path / "o.zarr"), "--config",
                                    str(tmp_path / "nope.yaml")])
    assert res.exit_code != 0 and "config file not found" in res.output
