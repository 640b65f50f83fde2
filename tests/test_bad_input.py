"""Bad input through the command line: every case ends with exit status 2 and one
``error:`` line naming the problem, before any expensive work where possible, with nothing
of the user's damaged (the model directory is unchanged, no output appears).

The cases call the entry point ``dist_quant.__main__.main(argv)`` in this process: the same
argument parsing and error handling as ``python -m dist_quant`` (whose exit status is
``main``'s return value, checked in a subprocess by test_config.py), without paying the
interpreter start-up per case. More ranks than work: see test_failure.py."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import call_main  # noqa: E402
from tiny import WIKI, make_tiny_model  # noqa: E402

@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("bad") / "model", layers=1)


@pytest.fixture
def model(tiny_src, tmp_path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(tiny_src, tmp_path / "model"))


def snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def args(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    calib = WIKI
    return [f"model.path={model}", f"calib.path={calib}", "calib.num_samples=8", "calib.seq_len=32",
            "quant.group_size=32", f"output.dir={tmp_path / 'out'}", f"runtime.run_dir={tmp_path / 'run'}",
            *extra]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = call_main(argv)
    return rc, capsys.readouterr().err


def expect_error(model: Path, tmp_path: Path, capsys, *needles: str, extra=(), argv=None) -> str:
    before = snapshot(model) if model.is_dir() else None
    rc, err = run_cli(argv if argv is not None else args(model, tmp_path, *extra), capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    if before is not None:
        assert snapshot(model) == before, "the model directory was changed"
    return lines[0]


# -- the model directory --------------------------------------------------------------------------
def test_model_dir_missing(tmp_path, capsys):
    expect_error(tmp_path / "nope", tmp_path, capsys, "nope", "not a directory")


def test_no_config_json(model, tmp_path, capsys):
    (model / "config.json").unlink()
    expect_error(model, tmp_path, capsys, "config.json", "not found")


def test_unsupported_architecture(model, tmp_path, capsys):
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))
    expect_error(model, tmp_path, capsys, "model_type='gpt2'", "not supported")


def _index_all_in_one(model: Path) -> dict:
    names = list(load_file(str(model / "model.safetensors")))
    return {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}


@pytest.mark.parametrize("case", ["file_missing", "tensor_not_in_file", "weight_absent"])
def test_safetensors_missing(model, tmp_path, capsys, case):
    from safetensors.torch import save_file

    index = _index_all_in_one(model)
    victim = "model.layers.0.mlp.down_proj.weight"
    if case == "file_missing":  # the index names a shard that is not there
        index["weight_map"][victim] = "model-00002-of-00002.safetensors"
        needles = ("model-00002-of-00002.safetensors", "missing")
    elif case == "tensor_not_in_file":  # the index names a tensor its shard lacks
        index["weight_map"]["model.layers.0.mlp.extra.weight"] = "model.safetensors"
        needles = ("model.layers.0.mlp.extra.weight", "lacks")
    else:  # a weight the architecture needs is in no file
        tensors = load_file(str(model / "model.safetensors"))
        del tensors[victim], index["weight_map"][victim]
        save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
        needles = (victim, "lacks")
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(model, tmp_path, capsys, *needles)


def test_truncated_weights(model, tmp_path, capsys):
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    expect_error(model, tmp_path, capsys, "model.safetensors", "truncated")


def test_corrupt_weights(model, tmp_path, capsys):
    (model / "model.safetensors").write_bytes(os.urandom(5000))
    expect_error(model, tmp_path, capsys, "model.safetensors", "corrupt")


def test_header_shape_disagrees_with_config(model, tmp_path, capsys):
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the weights were saved with 128
    (model / "config.json").write_text(json.dumps(cfg))
    expect_error(model, tmp_path, capsys, "mlp.", "[128, 64]", "[96, 64]", "config.json")


def test_nan_in_weights(model, tmp_path, capsys):
    from safetensors.torch import save_file

    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    before = snapshot(model)
    expect_error(model, tmp_path, capsys, "model.layers.0.self_attn.k_proj.weight", "NaN",
                 extra=("quant=rtn_w4a16",))
    assert snapshot(model) == before


# -- pickle weights -------------------------------------------------------------------------------
def _to_pickle(model: Path, name: str = "pytorch_model.bin") -> None:
    torch.save(load_file(str(model / "model.safetensors")), model / name)
    (model / "model.safetensors").unlink()


def test_pickle_weights_refused_by_default(model, tmp_path, capsys):
    _to_pickle(model)
    expect_error(model, tmp_path, capsys, "pickle", "pytorch_model.bin", "model.allow_pickle=true")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


def test_pickle_with_code_refused_even_when_allowed(model, tmp_path, capsys, monkeypatch):
    _to_pickle(model)
    state = torch.load(model / "pytorch_model.bin")
    state["evil"] = Evil()
    torch.save(state, model / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    expect_error(model, tmp_path, capsys, "pytorch_model.bin", "weights_only", extra=("model.allow_pickle=true",))
    assert not (tmp_path / "EVIL_RAN").exists()


def test_pickle_weights_allowed_give_the_safetensors_result(model, tmp_path, capsys):
    ref_out, pkl_out = tmp_path / "ref", tmp_path / "pkl"
    rc, err = run_cli(args(model, tmp_path, "quant=rtn_w4a16", f"output.dir={ref_out}"), capsys)
    assert rc == 0, err
    _to_pickle(model)
    rc, err = run_cli(args(model, tmp_path, "quant=rtn_w4a16", "model.allow_pickle=true",
                           f"output.dir={pkl_out}", f"runtime.run_dir={tmp_path / 'run2'}"), capsys)
    assert rc == 0, err
    for f in sorted(ref_out.glob("*.safetensors")):
        assert (pkl_out / f.name).read_bytes() == f.read_bytes()


def test_trust_remote_code_refused(model, tmp_path, capsys):
    expect_error(model, tmp_path, capsys, "trust_remote_code", "never runs code",
                 extra=("model.trust_remote_code=true",))


def test_checkpoint_code_never_runs(model, tmp_path, capsys, monkeypatch):
    """config.json / tokenizer_config.json pointing at code in the model dir: not imported."""
    marker = tmp_path / "CODE_RAN"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    for name, key in (("config.json", "AutoModelForCausalLM"), ("tokenizer_config.json", "AutoTokenizer")):
        cfg = json.loads((model / name).read_text())
        cfg["auto_map"] = {key: "evil.Evil", "AutoConfig": "evil.EvilConfig"}
        (model / name).write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    rc, err = run_cli(args(model, tmp_path, "quant=rtn_w4a16"), capsys)
    assert not marker.exists(), "code from the checkpoint ran"
    assert rc in (0, 2), err


# -- quantization settings ------------------------------------------------------------------------
def test_group_size_not_dividing(model, tmp_path, capsys):
    expect_error(model, tmp_path, capsys, "quant.group_size=48", "does not divide", "64",
                 extra=("quant.group_size=48",))


def test_bits_not_supported(model, tmp_path, capsys):
    expect_error(model, tmp_path, capsys, "quant.bits=3", "4 and 8", extra=("quant.bits=3",))


# -- calibration ----------------------------------------------------------------------------------
def test_calibration_missing(model, tmp_path, capsys):
    expect_error(model, tmp_path, capsys, "calib.path", "not found",
                 extra=(f"calib.path={tmp_path / 'nope.txt'}",))


def test_calibration_empty(model, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    expect_error(model, tmp_path, capsys, "empty.txt", "empty", extra=(f"calib.path={tmp_path / 'empty.txt'}",))


def test_calibration_too_short(model, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("Only a few words here.\n")
    expect_error(model, tmp_path, capsys, "short.txt", "fewer than", "calib.num_samples=8",
                 extra=(f"calib.path={tmp_path / 'short.txt'}",))


# -- configuration --------------------------------------------------------------------------------
def test_unknown_config_key(model, tmp_path, capsys):
    expect_error(model, tmp_path, capsys, "quant.groupsize", "unknown configuration key",
                 extra=("quant.groupsize=32",))
    expect_error(model, tmp_path, capsys, "quant=w3", "no such preset", "rtn_w4a16", extra=("quant=w3",))


def test_bad_override_value(model, tmp_path, capsys):
    expect_error(model, tmp_path, capsys, "calib.num_samples", extra=("calib.num_samples=lots",))


# -- the output -----------------------------------------------------------------------------------
def test_output_dir_not_empty(model, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    expect_error(model, tmp_path, capsys, "mine", "not empty", "output.overwrite=true",
                 extra=(f"output.dir={out}",))
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_output_not_writable(model, tmp_path, capsys):
    (tmp_path / "afile").write_text("a file, not a directory")
    expect_error(model, tmp_path, capsys, "not writable", extra=(f"output.dir={tmp_path / 'afile' / 'out'}",))
    assert (tmp_path / "afile").read_text() == "a file, not a directory"


def test_output_containing_the_model_refused_even_with_overwrite(model, tmp_path, capsys):
    expect_error(model, tmp_path, capsys, "contains the model directory",
                 extra=(f"output.dir={tmp_path}", "output.overwrite=true"))


def test_not_enough_disk(model, tmp_path, capsys, monkeypatch):
    import dist_quant.preflight as preflight

    real = shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=10 * 2**20))  # 10 MiB free
    expect_error(model, tmp_path, capsys, "not enough free disk", "GB needed")


# -- unsafe model directories ---------------------------------------------------------------------
def test_index_naming_path_outside_model_dir(model, tmp_path, capsys):
    shutil.copy(model / "model.safetensors", tmp_path / "outside.safetensors")
    index = _index_all_in_one(model)
    index["weight_map"] = {k: "../outside.safetensors" for k in index["weight_map"]}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(model, tmp_path, capsys, "../outside.safetensors", "outside the model directory")


@pytest.mark.parametrize("key,value", [("tokenizer_file", "/etc/hostname"), ("vocab_file", "../../vocab.json")])
def test_tokenizer_config_naming_path_outside_model_dir(model, tmp_path, capsys, key, value):
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg[key] = value
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    expect_error(model, tmp_path, capsys, "tokenizer_config.json", key, value, "outside the model directory")


@pytest.mark.parametrize("victim", ["config.json", "tokenizer.json"])
def test_oversized_json(model, tmp_path, capsys, monkeypatch, victim):
    import dist_quant.checkpoint as checkpoint

    config_size = (model / "config.json").stat().st_size
    assert (model / "tokenizer.json").stat().st_size > config_size
    monkeypatch.setattr(checkpoint, "MAX_JSON_BYTES", 100 if victim == "config.json" else config_size)
    expect_error(model, tmp_path, capsys, victim, "limit")


def test_sharded_pickle_checkpoint_behind_the_same_interface(model):
    """``pytorch_model.bin.index.json`` + shards, read lazily (mmap) only with allow_pickle;
    trainer files next to them are not taken for weights."""
    from dist_quant.checkpoint import Checkpoint, CheckpointError

    ref = load_file(str(model / "model.safetensors"))
    names = sorted(ref)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, keys in shards.items():
        torch.save({k: ref[k] for k in keys}, model / fname)
    (model / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    torch.save({"not": "weights"}, model / "training_args.bin")
    (model / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="allow_pickle"):
        Checkpoint(model)
    ckpt = Checkpoint(model, allow_pickle=True)
    assert sorted(ckpt.tensors) == names
    for name in names:
        info = ckpt.tensors[name]
        assert info.file == next(f for f, keys in shards.items() if name in keys)
        got = ckpt.get(name)
        assert info.shape == tuple(got.shape) and torch.equal(got, ref[name])
    got.zero_()  # a fresh tensor: the checkpoint's data is not changed through it
    assert torch.equal(ckpt.get(name), ref[name])
