"""Strict config: unknown keys, bad values, duplicates and env overrides name the key path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from daemon.config import DEFAULT_CONFIG, Config, ConfigError, load_config


def _load(tmp_path, text, env=None):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_config(p, environ=env or {})


def _paths(e: ConfigError) -> list[str]:
    return [p for p, _ in e.problems]


def test_default_file_equals_the_model_defaults():
    """config/default.yaml and the built-in defaults cannot drift apart."""
    assert load_config(DEFAULT_CONFIG, environ={}) == Config()
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert set(data) == set(Config.model_fields)


@pytest.mark.parametrize("text,path", [
    ("ingest:\n  bogus: 1\n", "ingest.bogus"),
    ("nonsense: 1\n", "nonsense"),
    ("ingest:\n  max_frame_bytes: -1\n", "ingest.max_frame_bytes"),
    ("ingest:\n  socket: dealer\n", "ingest.socket"),
    ("ingest:\n  endpoint: tcp://127.0.0.1:5555\n", "ingest.endpoint"),
    ("recipe:\n  overhang_min_um: 3000\n", "recipe"),
    ("recipe:\n  expected_layers: 40\n", "recipe"),
    ("feed:\n  size: [64, 64]\n", "feed.size"),
    ("feed:\n  bits: 12\n", "feed.bits"),
    ("log:\n  level: chatty\n", "log.level"),
    ("roi:\n  n_corners: 2048\n", "roi.n_corners"),
    ("roi:\n  n_corners: 32\n", "roi.n_corners"),
    ("model:\n  fixed_shape: sometimes\n", "model.fixed_shape"),
    ("model:\n  cudnn_conv_algo_search: FAST\n", "model.cudnn_conv_algo_search"),
    ("pipeline:\n  opencv_threads: -1\n", "pipeline.opencv_threads"),
])
def test_errors_name_the_key(tmp_path, text, path):
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, text)
    assert path in _paths(ei.value), ei.value.problems
    assert path in str(ei.value)


def test_duplicate_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, "recipe:\n  name: a\n  overhang_min_um: 700\n  name: b\n")
    assert _paths(ei.value) == ["recipe.name"]
    assert "line 4" in str(ei.value)


def test_roi_section_builds_the_stage_parameters(tmp_path):
    cfg = _load(tmp_path, "roi:\n  n_corners: 256\n  margin_ahead_px: 16\n")
    p = cfg.roi.params()
    assert p.n_corners == 256 and p.percentiles == (0.5, 99.5)
    assert (p.margin_behind_px, p.margin_ahead_px, p.margin_across_px) == (16.0, 16.0, 12.0)


def test_env_overrides(tmp_path):
    cfg = _load(tmp_path, "ingest:\n  hwm: 5\n", {
        "POLECHECK_INGEST__HWM": "9", "POLECHECK_RECIPE__EXPECTED_LAYERS": "41",
        "POLECHECK_CONFIG": "ignored", "OTHER": "x"})
    assert cfg.ingest.hwm == 9 and cfg.recipe.expected_layers == 41


@pytest.mark.parametrize("env,path", [
    ({"POLECHECK_INGEST__HWMM": "9"}, "ingest.hwmm"),
    ({"POLECHECK_INGEST__HWM": "many"}, "ingest.hwm"),
    ({"POLECHECK_BOGUS": "1"}, "bogus"),
])
def test_bad_env_overrides_name_the_key(tmp_path, env, path):
    with pytest.raises(ConfigError) as ei:
        _load(tmp_path, "", env)
    assert path in _paths(ei.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match="<yaml>"):
        _load(tmp_path, "ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        _load(tmp_path, "- 1\n")


def test_check_config_cli(tmp_path):
    good = subprocess.run([sys.executable, "-m", "daemon.cli", "check-config", str(DEFAULT_CONFIG)],
                          capture_output=True, text=True)
    assert good.returncode == 0 and "ingest:" in good.stdout
    bad = tmp_path / "b.yaml"
    bad.write_text("ingest:\n  hwm: 0\n")
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "check-config", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "ingest.hwm" in out.stderr


def test_roi_defaults_match_the_stage_defaults():
    from daemon.roi import RoiParams

    assert Config().roi.params() == RoiParams()
