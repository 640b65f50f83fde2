"""Load the Hydra configuration from ``conf/`` and turn it into a typed :class:`JobConfig`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, JobConfig

CONF_DIR = Path(os.environ.get("DIST_QUANT_CONF_DIR", Path(__file__).resolve().parents[1] / "conf"))


def compose(overrides: Sequence[str], conf_dir: Path = CONF_DIR):
    """Compose ``conf/config.yaml`` with Hydra overrides (``key=value``, ``quant=rtn_w4a16``)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException

    if not (conf_dir / "config.yaml").is_file():
        raise ConfigError(f"config dir {str(conf_dir)!r} has no config.yaml (set DIST_QUANT_CONF_DIR)")
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_compose_error(exc)) from None


def _compose_error(exc: Exception) -> str:
    """Hydra's composition errors as one line (without its advice to append unknown keys with ``+``)."""
    import re

    text = str(exc)
    m = re.match(r"Could not override '([^']+)'", text)
    if m and "+" + m.group(1) in text:
        return f"{m.group(1)}: unknown configuration key (python -m dist_quant --help lists the keys)"
    m = re.search(r"Could not find '([^'/]+)/([^']+)'\s*Available options in '[^']+':\s*(.*)", text, re.S)
    if m:
        options = ", ".join(ln.strip() for ln in m.group(3).split("Config search path")[0].splitlines()
                            if ln.strip())
        return f"{m.group(1)}={m.group(2)}: no such preset; available: {options}"
    return _one_line(exc)


def to_job_config(cfg) -> JobConfig:
    """Validate a composed DictConfig against the typed schema and build frozen dataclasses."""
    try:
        schema = OmegaConf.structured(JobConfig)
        _unfreeze(schema)  # frozen dataclasses make the schema read-only; merging needs it writable
        merged = OmegaConf.merge(schema, cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None


def _unfreeze(node) -> None:
    OmegaConf.set_readonly(node, None)
    if OmegaConf.is_dict(node):
        for key in node:
            child = node._get_node(key)
            if OmegaConf.is_config(child):
                _unfreeze(child)


# When model.path is unset the job quantizes the embedded demo model (SmolLM2-135M-Instruct,
# hidden size 576, which 128 does not divide) and should finish in minutes on a laptop CPU.
# Applied only to keys the user did not set; grouped presets get group size 64,
# per-channel presets (group_size=-1) keep theirs.
DEMO_DEFAULTS = {"quant.group_size": 64, "calib.num_samples": 32, "calib.seq_len": 512}


def override_keys(overrides: Sequence[str]) -> set[str]:
    """Keys an override list sets explicitly (``quant.bits=8`` → ``quant.bits``; ``+a.b=1`` → ``a.b``)."""
    return {o.split("=", 1)[0].lstrip("+~").strip() for o in overrides if "=" in o}


def float_preset(cfg) -> bool:
    """FP8 weights or FP8 activations: their group sizes are fixed by the kernels (128), not a choice."""
    return cfg.quant.get("weight_type", "int") == "fp8" or cfg.quant.get("act_type", "int") == "fp8"


def apply_demo_defaults(cfg, overrides: Sequence[str]) -> None:
    """Set :data:`DEMO_DEFAULTS` on a composed config whose model.path is unset."""
    if cfg.model.path is not None:
        return
    explicit = override_keys(overrides)
    for key, value in DEMO_DEFAULTS.items():
        if key in explicit or (key == "quant.group_size" and (cfg.quant.group_size == -1 or float_preset(cfg))):
            continue
        OmegaConf.update(cfg, key, value, merge=False)


def compose_job(overrides: Sequence[str]):
    """The composed DictConfig the command line runs: :func:`compose` plus the demo defaults."""
    cfg = compose(overrides)
    apply_demo_defaults(cfg, overrides)
    return cfg


def load_config(overrides: Sequence[str], demo_defaults: bool = False) -> JobConfig:
    """The typed config for these overrides; ``demo_defaults``: apply :data:`DEMO_DEFAULTS`
    when no model.path is given (what the command line does)."""
    cfg = compose(overrides)
    if demo_defaults:
        apply_demo_defaults(cfg, overrides)
    return to_job_config(cfg)


def _one_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key", "object_type", "reference_type"))]
    full_key = next((ln for ln in lines if ln.startswith("full_key")), None)
    text = " ".join(keep[:2]) if keep else type(exc).__name__
    return f"{text} ({full_key})" if full_key and full_key.split(":", 1)[1].strip() else text
