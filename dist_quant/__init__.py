"""dist_quant: distributed post-training quantization of large language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "record":  # dist_quant.record: lazily, so `import dist_quant` stays light
        from .recorder import record

        return record
    raise AttributeError(f"module 'dist_quant' has no attribute {name!r}")
