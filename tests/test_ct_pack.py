"""The packed W4A16 / W8A16 tensors equal what compressed-tensors' own compressor writes.

``compress_linear`` packs the solver's integers with the library's ``pack_to_int32`` instead of
handing the dequantized weight to ``PackedQuantizationCompressor.compress`` (which re-quantizes
it with the same scales); both must give the same bytes, symmetric and asymmetric, 4 and 8 bits,
per group and per channel."""
from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

from dist_quant.algorithms.rtn import rtn_quantize
from dist_quant.formats.compressed_tensors import compress_linear, scheme
from dist_quant.quant.qparams import QuantArgs


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, -1])
def test_packed_tensors_equal_the_library_compressor(bits, symmetric, group):
    g = torch.Generator().manual_seed(bits + group)
    w = torch.randn(72, 128, generator=g) * 0.02 + (0.0 if symmetric else 0.005)
    args = QuantArgs(bits=bits, group_size=group, symmetric=symmetric, scale_dtype=torch.bfloat16)
    result = rtn_quantize(w, args)
    ours = compress_linear("m", result, args)
    state = {"weight": result.dequantize(args), "weight_scale": result.scale}
    if not symmetric:
        state["weight_zero_point"] = result.zero
    lib = PackedQuantizationCompressor.compress(state, scheme(args))
    lib["weight_scale"] = result.scale.to(args.scale_dtype)
    assert sorted(ours) == sorted(f"m.{k}" for k in lib)
    for key, value in lib.items():
        assert ours[f"m.{key}"].dtype == value.dtype and torch.equal(ours[f"m.{key}"], value), key
