"""Hydra overrides → typed JobConfig (dist_quant/settings.py, dist_quant/config.py), and the
CLI's one-line error for a bad value."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_quant.config import ConfigError, JobConfig, parse_size
from dist_quant.settings import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_match_the_gptq_w4a16_preset():
    cfg = load_config([])
    assert isinstance(cfg, JobConfig)
    assert (cfg.quant.name, cfg.quant.method, cfg.quant.bits, cfg.quant.group_size) == ("gptq_w4a16", "gptq", 4, 128)
    assert cfg.quant.ignore == ["lm_head"]
    assert (cfg.calib.num_samples, cfg.calib.seq_len) == (128, 512)
    assert cfg.output.part_file_bytes == 2 * 10**9
    assert cfg.model.path is None and cfg.dry_run is False


def test_public_overrides_parse_exactly_as_written(tmp_path):
    model_dir, calib, out = tmp_path / "model", tmp_path / "calib.txt", tmp_path / "out"
    cfg = load_config([f"model.path={model_dir}", "quant=gptq_w4a16", "quant.group_size=64",
                       f"calib.path={calib}", "calib.num_samples=128", "calib.seq_len=512",
                       f"output.dir={out}", "output.part_file_size=2GB"])
    assert cfg.model.path == str(model_dir)
    assert cfg.quant.name == "gptq_w4a16" and cfg.quant.method == "gptq" and cfg.quant.bits == 4
    assert cfg.quant.group_size == 64 and type(cfg.quant.group_size) is int
    assert cfg.calib.path == str(calib)
    assert cfg.calib.num_samples == 128 and type(cfg.calib.num_samples) is int
    assert cfg.calib.seq_len == 512 and type(cfg.calib.seq_len) is int
    assert cfg.output.dir == str(out)
    assert cfg.output.part_file_size == "2GB"
    assert cfg.output.part_file_bytes == 2_000_000_000
    # Typed and frozen.
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.quant.bits = 8  # type: ignore[misc]


@pytest.mark.parametrize("preset,method,bits,group", [
    ("rtn_w4a16", "rtn", 4, 128),
    ("gptq_w8a16", "gptq", 8, -1),
    ("rtn_w8a16", "rtn", 8, -1),
    ("gptq_w4a16", "gptq", 4, 128),
])
def test_quant_presets(preset, method, bits, group):
    q = load_config([f"quant={preset}"]).quant
    assert (q.name, q.method, q.bits, q.group_size) == (preset, method, bits, group)
    assert q.symmetric is True


def test_per_channel_group_size_and_preset_plus_key():
    assert load_config(["quant.group_size=-1"]).quant.group_size == -1
    q = load_config(["quant=rtn_w4a16", "quant.group_size=-1", "quant.bits=8"]).quant
    assert (q.method, q.group_size, q.bits) == ("rtn", -1, 8)


def test_path_with_spaces_and_equals_kept_verbatim(tmp_path):
    weird = tmp_path / "my models" / "a=b"
    assert load_config([f"model.path='{weird}'"]).model.path == str(weird)


@pytest.mark.parametrize("text,expected", [
    (123, 123), ("123", 123), ("500MB", 500 * 10**6), ("2GB", 2 * 10**9), ("1GiB", 2**30),
    ("1gib", 2**30), ("500 MB", 500 * 10**6), ("10KB", 10_000), ("3KiB", 3072), ("4MiB", 4 * 2**20),
    ("1TB", 10**12), ("7B", 7), ("1.5GiB", 3 * 2**29), ("0.5KB", 500),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected
    assert type(parse_size(text)) is int


@pytest.mark.parametrize("text,expected", [("2.01KB", 2010), ("4.02MB", 4_020_000)])
def test_parse_size_decimal_is_exact(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("value,expected", [("123", 123), ("500MB", 500 * 10**6), ("2GB", 2 * 10**9),
                                            ("1GiB", 2**30)])
def test_part_file_size_override(value, expected):
    assert load_config([f"output.part_file_size={value}"]).output.part_file_bytes == expected


@pytest.mark.parametrize("bad", ["2XB", "abc", "0", "-5", "1e9", "GB", "", "0.1B"])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError) as err:
        parse_size(bad, "output.part_file_size")
    assert "output.part_file_size" in str(err.value)
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize("override,needles", [
    ("quant.bits=3", ["quant.bits", "3"]),
    ("quant.group_size=0", ["quant.group_size", "0"]),
    ("quant.group_size=-2", ["quant.group_size", "-2"]),
    ("quant.method=awq", ["quant.method", "awq"]),
    ("quant.observer=foo", ["quant.observer", "foo"]),
    ("quant.damp=0", ["quant.damp"]),
    ("quant.foo=1", ["quant.foo"]),
    ("+quant.foo=1", ["foo"]),
    ("bogus=1", ["bogus"]),
    ("calib.num_samples=abc", ["calib.num_samples", "abc"]),
    ("calib.num_samples=1.5", ["calib.num_samples", "1.5"]),
    ("calib.num_samples=0", ["calib.num_samples", "0"]),
    ("calib.seq_len=1", ["calib.seq_len", "1"]),
    ("quant=gptq_w3a16", ["gptq_w3a16"]),
    ("quant=nope", ["nope"]),
    ("output.part_file_size=2XB", ["output.part_file_size", "2XB"]),
    ("output.part_file_size=-1", ["output.part_file_size", "-1"]),
    ("output.format=gguf", ["output.format", "gguf"]),
    ("model.dtype=int8", ["model.dtype", "int8"]),
    ("runtime.device=tpu", ["runtime.device", "tpu"]),
    ("runtime.world_size=0", ["runtime.world_size"]),
])
def test_bad_values_are_config_errors_naming_key_or_value(override, needles):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    msg = str(err.value)
    assert "\n" not in msg.strip()
    for needle in needles:
        assert needle in msg, (override, msg)


def test_cli_bad_value_prints_one_error_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "dist_quant", "quant.bits=3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "quant.bits=3" in lines[0] and "4 and 8" in lines[0], lines
    assert lines[0].startswith("error:")
    assert "quant.bits" in lines[0] and "3" in lines[0]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "runs").exists()
