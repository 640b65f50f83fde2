"""Hydra's command-line conventions: ``--help`` (groups, presets, every key with default and
meaning), ``--cfg job``, ``--info``, unknown flags, and the run directory's ``.hydra/`` record
that ``--rerun`` repeats. The expected keys and defaults are read from the YAML files in
``conf/`` here, independently of dist_quant's own composition."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import REPO, hash_dir, job_env, run_main

CONF = REPO / "conf"


def leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def default_leaves() -> dict[str, object]:
    """The default composition by hand: every group's chosen preset under its group key, then the
    primary config's own keys (``_self_`` last)."""
    top = yaml.safe_load((CONF / "config.yaml").read_text())
    merged: dict = {}
    for entry in top.pop("defaults"):
        if isinstance(entry, dict):
            (group, preset), = entry.items()
            merged.setdefault(group, {}).update(yaml.safe_load((CONF / group / f"{preset}.yaml").read_text()) or {})
    for k, v in top.items():
        if isinstance(v, dict):
            merged.setdefault(k, {}).update(v)
        else:
            merged[k] = v
    return leaves(merged)


def test_help_lists_groups_presets_and_every_key_with_default_and_meaning():
    proc = subprocess.run([sys.executable, "-m", "dist_quant", "--help", "model.path=/some/model"], cwd=REPO,
                          env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "LexerNoViableAltException" not in text + proc.stderr
    for group in (d for d in CONF.iterdir() if d.is_dir()):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(group.name + " "))
        for preset in group.glob("*.yaml"):
            assert preset.stem in line, (group.name, preset.stem)
    lines = text.splitlines()
    for key, value in default_leaves().items():
        if key == "model.path":
            value = "/some/model"
        rows = [i for i, ln in enumerate(lines) if ln.split()[:1] == [key]]
        assert rows, f"{key} missing from --help"
        shown = lines[rows[0]].split(None, 1)[1].strip()
        expect = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        assert shown == expect, (key, shown, expect)
        meaning = lines[rows[0] + 1].strip()
        assert meaning and meaning.split()[0] not in default_leaves(), f"{key} has no meaning in --help"


def test_cfg_job_prints_the_composed_config():
    rc, out, err = run_main(["--cfg", "job", "quant=rtn_w8a16", "calib.seq_len=77", "model.path=/m"])
    assert rc == 0, err
    cfg = yaml.safe_load(out)
    expect = leaves(yaml.safe_load((CONF / "quant" / "rtn_w8a16.yaml").read_text()))
    for key, value in expect.items():
        assert cfg["quant"][key] == value, key
    assert cfg["calib"]["seq_len"] == 77 and cfg["model"]["path"] == "/m"
    assert set(cfg) >= {"model", "quant", "calib", "output", "runtime", "dry_run", "resume"}


def test_info_shows_search_path_defaults_and_overrides():
    rc, out, err = run_main(["--info", "quant=w8a8"])
    assert rc == 0, err
    assert f"file://{CONF}" in out and "quant: gptq_w4a16" in out and "  quant=w8a8" in out
    assert "name: w8a8" in out  # the composed config follows


@pytest.mark.parametrize("argv,needle", [(["--bogus"], "--bogus"), (["--cfg", "everything"], "'everything'"),
                                         (["--rerun", "/no/such/run"], "/no/such/run")])
def test_bad_flags_are_one_line_errors(argv, needle):
    rc, out, err = run_main(argv)
    assert rc == 2 and out == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_run_dir_keeps_config_and_overrides_and_rerun_repeats_the_run(tmp_path, tiny_model, calib_file):
    model = tiny_model(layers=1, hidden=64, intermediate=128)
    argv = [f"model.path={model}", "quant=rtn_w4a16", "quant.group_size=32", f"calib.path={calib_file}",
            "calib.num_samples=4", "calib.seq_len=32", f"output.dir={tmp_path / 'out'}",
            f"runtime.run_dir={tmp_path / 'run'}", "runtime.threads=1"]
    rc, _, err = run_main(argv)
    assert rc == 0, err
    record = tmp_path / "run" / ".hydra"
    assert yaml.safe_load((record / "overrides.yaml").read_text()) == argv
    saved = yaml.safe_load((record / "config.yaml").read_text())
    rc, shown, err = run_main(["--cfg", "job", *argv])
    assert rc == 0 and saved == yaml.safe_load(shown), err
    assert saved["quant"]["method"] == "rtn" and saved["calib"]["num_samples"] == 4

    rc, _, err = run_main(["--rerun", str(tmp_path / "run"), f"output.dir={tmp_path / 'again'}",
                           f"runtime.run_dir={tmp_path / 'run2'}"])
    assert rc == 0, err
    first, again = hash_dir(tmp_path / "out"), hash_dir(tmp_path / "again")
    tensors = [k for k in first if k.endswith(".safetensors")]
    assert tensors and {k: first[k] for k in tensors} == {k: again[k] for k in tensors}
    rerun = yaml.safe_load((tmp_path / "run2" / ".hydra" / "overrides.yaml").read_text())
    assert rerun[:len(argv)] == argv and rerun[len(argv):] == [f"output.dir={tmp_path / 'again'}",
                                                              f"runtime.run_dir={tmp_path / 'run2'}"]
