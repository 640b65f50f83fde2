"""dist_quant: distributed post-training quantization of large language models."""

__version__ = "0.1.0"
