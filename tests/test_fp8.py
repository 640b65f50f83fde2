"""FP8 block release checkpoints (DeepSeek-V3 / Kimi-K2 layout: float8_e4m3fn ``weight`` +
float32 ``weight_scale_inv`` per 128×128 block, ``quantization_config.quant_method: fp8``) read
as float, one tensor at a time, against an FP8 checkpoint made here and its float32 twin
dequantized by the published rule in this file."""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_quant.checkpoint import Checkpoint, CheckpointError  # noqa: E402
from tiny_deepseek import fp8_blocks  # noqa: E402  (amax/448 per block, independent of dist_quant/fp8.py)

BLOCK = (16, 32)  # small blocks so the tiny model has several, partial edge blocks included
FP8_QC = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": list(BLOCK), "scale_fmt": "ue8m0"}  # V3.1 adds a scale-format key


def ref_dequantize(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    w = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            w[sl] = q[sl].float() * scale[i, j]
    return w


FP8_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_fp8_pair(src: Path, fp8_dir: Path, twin_dir: Path) -> None:
    """``fp8_dir``: the tiny model with its layer linears stored as FP8 blocks; ``twin_dir``: the
    same model with those linears float32-dequantized (what the FP8 release means)."""
    for d in (fp8_dir, twin_dir):
        shutil.copytree(src, d)
        for f in d.glob("*.safetensors"):
            f.unlink()
    tensors = load_file(str(src / "model.safetensors"))
    fp8, twin = {}, {}
    for name, t in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in FP8_LINEARS:
            q, s = fp8_blocks(t, BLOCK)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            twin[name] = ref_dequantize(q, s, BLOCK)
        else:
            fp8[name] = twin[name] = t
    save_file(fp8, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(twin, str(twin_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (twin_dir / "config.json").write_text(json.dumps(cfg))
    cfg["quantization_config"] = FP8_QC
    (fp8_dir / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tiny import make_tiny_model

    root = tmp_path_factory.mktemp("fp8")
    # in/out features 40/72/24 are not multiples of the block: partial edge blocks
    src = make_tiny_model(root / "src", arch="llama", layers=2, hidden=40, intermediate=72, heads=4, kv_heads=2)
    make_fp8_pair(src, root / "fp8", root / "twin")
    return root


def test_fp8_tensors_read_as_their_float32_dequantization(pair):
    ckpt, twin = Checkpoint(pair / "fp8"), Checkpoint(pair / "twin")
    assert set(ckpt.tensors) == set(twin.tensors)  # no *_scale_inv listed
    assert not any(n.endswith("_scale_inv") for n in ckpt.tensors)
    name = "model.layers.1.mlp.down_proj.weight"
    info = ckpt.tensors[name]
    assert info.stored_dtype == "F8_E4M3" and info.dtype == "F32" and info.shape == (40, 72)
    assert info.read_bytes == 40 * 72 + math.ceil(40 / BLOCK[0]) * math.ceil(72 / BLOCK[1]) * 4
    for n in twin.tensors:
        a, b = ckpt.get(n), twin.get(n)
        assert a.dtype == b.dtype and torch.equal(a, b), n
    assert ckpt.output_config() == json.loads((pair / "twin" / "config.json").read_text())


def _job(model: Path, out: Path, calib: Path, *extra: str) -> None:
    from helpers import run_main

    rc, _, err = run_main([f"model.path={model}", "quant=gptq_w4a16", "quant.group_size=8",
                           f"calib.path={calib}", "calib.num_samples=8", "calib.seq_len=32",
                           f"output.dir={out}", f"runtime.run_dir={out}.run", "runtime.threads=1", *extra])
    assert rc == 0, err[-3000:]


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    res = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            res.update({k: fh.get_tensor(k) for k in fh.keys()})
    return res


def test_fp8_source_gives_the_integers_of_its_float32_twin(pair, tmp_path):
    from tiny import corpus_text

    calib = tmp_path / "calib.txt"
    calib.write_text(corpus_text(20_000), encoding="utf-8")
    _job(pair / "fp8", tmp_path / "out_fp8", calib)
    _job(pair / "twin", tmp_path / "out_twin", calib)
    a, b = _tensors(tmp_path / "out_fp8"), _tensors(tmp_path / "out_twin")
    assert set(a) == set(b) and not any(n.endswith("_scale_inv") for n in a)
    assert any(n.endswith("weight_packed") for n in a)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n
    ca = json.loads((tmp_path / "out_fp8" / "config.json").read_text())
    cb = json.loads((tmp_path / "out_twin" / "config.json").read_text())
    assert ca == cb and ca["quantization_config"]["quant_method"] == "compressed-tensors"


# -- bad FP8 sources: one line naming the tensor --------------------------------------------------
def _damaged(pair, tmp_path, edit) -> Path:
    d = Path(shutil.copytree(pair / "fp8", tmp_path / "bad"))
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_missing_scale_names_the_tensor(pair, tmp_path):
    d = _damaged(pair, tmp_path, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight_scale_inv"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has no "
                                              r"'model\.layers\.0\.self_attn\.k_proj\.weight_scale_inv'") as e:
        Checkpoint(d)
    assert "\n" not in str(e.value)


def test_misshaped_scale_names_the_tensor(pair, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight_scale_inv"
    d = _damaged(pair, tmp_path, lambda t: t.__setitem__(name, torch.ones(1, 1)))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[1, 1\], expected \[5, 2\]"):
        Checkpoint(d)


def test_fp8_tensor_without_fp8_config_refused(pair, tmp_path):
    d = Path(shutil.copytree(pair / "fp8", tmp_path / "noqc"))
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="F8_E4M3 but config.json .* no quantization_config"):
        Checkpoint(d)


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"},
     "quant_method='compressed-tensors': the checkpoint is already quantized"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size=\[128\]"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt='e5m2'"),
])
def test_other_source_quantizations_refused(pair, tmp_path, qc, match):
    d = Path(shutil.copytree(pair / "twin", tmp_path / "q"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match) as e:
        Checkpoint(d)
    assert "\n" not in str(e.value)


def test_fp8_weight_left_float_is_written_in_the_release_dtype(pair, tmp_path):
    """An FP8 weight written through unquantized (here o_proj via quant.ignore; in DeepSeek-V3 the
    MTP layer) is stored in the release's float dtype (BF16 when config.json does not say),
    as w = fp8 · scale_inv rounded once, not as float32."""
    from tiny import corpus_text

    calib = tmp_path / "calib.txt"
    calib.write_text(corpus_text(20_000), encoding="utf-8")
    model = Path(shutil.copytree(pair / "fp8", tmp_path / "bf16_release"))
    cfg = json.loads((model / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "bfloat16"  # as DeepSeek-V3's config.json says
    (model / "config.json").write_text(json.dumps(cfg))
    _job(model, tmp_path / "out", calib, "quant.ignore=[lm_head,o_proj]")
    out = _tensors(tmp_path / "out")
    src = load_file(str(pair / "fp8" / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight"
    want = ref_dequantize(src[name], src[name + "_scale_inv"], BLOCK).to(torch.bfloat16)
    assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], want)
    assert out["model.layers.1.input_layernorm.weight"].dtype == torch.float32  # float tensors: as stored
