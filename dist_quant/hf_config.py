"""The transformers config of a checkpoint, built from its config.json *without running any
code from the checkpoint*.

* ``model_type`` values that name a checkpoint's remote code but whose layout is a built-in
  transformers class are mapped explicitly (:data:`MODEL_TYPE_ALIASES`): Kimi-K2 says
  ``model_type: kimi_k2`` with ``architectures: [DeepseekV3ForCausalLM]`` and an ``auto_map``
  to its own ``configuration_deepseek.py``; its keys are DeepSeek-V3's, so transformers'
  ``DeepseekV3Config`` reads them.
* What described the source's storage (an FP8 release's ``quantization_config``) is left out:
  the layers are built in float and the weights dequantized on read (dist_quant/fp8.py).

:func:`output_config` is the config.json an output starts from: the same mapping, so that
transformers and vLLM load the output without ``trust_remote_code`` (the ``auto_map`` entry is
dropped, ``model_type`` is the built-in one).
"""
from __future__ import annotations

MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}
SOURCE_ONLY_KEYS = ("quantization_config", "auto_map")


def canonical_model_type(model_type):
    return MODEL_TYPE_ALIASES.get(model_type, model_type)


def output_config(config: dict) -> dict:
    """config.json of the source, mapped to a built-in class and without the source's storage."""
    out = {k: v for k, v in config.items() if k not in SOURCE_ONLY_KEYS}
    if "model_type" in out:
        out["model_type"] = canonical_model_type(out["model_type"])
    return out


def hf_config(config: dict):
    """A transformers ``PretrainedConfig`` for ``config`` (a config.json dict)."""
    from transformers import CONFIG_MAPPING

    plain = output_config(config)
    model_type = plain.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model_type={model_type!r} has no transformers config class")
    return CONFIG_MAPPING[model_type].from_dict(plain)
