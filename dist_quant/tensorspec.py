"""Name, dtype and shape of a tensor to be written, known before its data exists."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import SAFETENSORS_DTYPES, TORCH_DTYPES, tensor_nbytes


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)

    @staticmethod
    def dtype_of(dtype: torch.dtype) -> str:
        return SAFETENSORS_DTYPES[dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def matches(self, tensor: torch.Tensor) -> bool:
        return tuple(tensor.shape) == self.shape and tensor.dtype == self.torch_dtype
