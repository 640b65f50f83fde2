"""The AutoAWQ GEMM checkpoint layout (``output.format=awq``): what transformers' AWQ
integration (``quant_method: awq``; its loader needs gptqmodel) and vLLM's ``awq`` /
``awq_marlin`` methods read.

Per quantized linear (``in`` input, ``out`` output features, groups of ``G`` input columns):

* ``qweight`` int32 ``[in, out/8]``: the unsigned 4-bit codes of ``Wᵀ``, eight output
  channels per int32, channel ``8c + AWQ_ORDER[i]`` in bits ``4i … 4i+3``;
* ``qzeros`` int32 ``[in/G, out/8]``: the zero points packed the same way;
* ``scales`` float16 ``[in/G, out]``; ``bias`` as the checkpoint has it.

``w = (code − zero) · scale``. dist_quant's signed integers ``q ∈ [−8, 7]`` with ``w = (q − z) ·
s`` become ``code = q + 8``, ``zero = z + 8`` (symmetric jobs: every zero is 8). Sources:
AutoAWQ ``awq/modules/linear/gemm.py`` (``WQLinear_GEMM.from_linear``, order ``[0, 2, 4, 6, 1,
3, 5, 7]``) and ``awq/utils/packing_utils.py`` (``AWQ_REVERSE_ORDER`` on unpacking); vLLM
``model_executor/layers/quantization/awq.py`` (``AWQLinearMethod.create_weights``: the three
shapes, ``pack_factor`` 8 on the output dimension, ``scales`` in the model dtype, float16 only).
"""
from __future__ import annotations

import torch

from ..quant.qparams import QuantArgs, QuantResult
from ..tensorspec import TensorSpec

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK = 8  # 4-bit values per int32
OFFSET = 8  # signed [-8, 7] -> unsigned [0, 15]


def pack_columns(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes ``[rows, cols]`` → int32 ``[rows, cols/8]`` in AWQ's order."""
    rows, cols = codes.shape
    c = codes.to(torch.int32).reshape(rows, cols // PACK, PACK)
    out = torch.zeros(rows, cols // PACK, dtype=torch.int32, device=codes.device)
    for i, src in enumerate(AWQ_ORDER):
        out |= (c[:, :, src] & 0xF) << (4 * i)
    return out


def compress_linear(name: str, result: QuantResult, args: QuantArgs) -> dict[str, torch.Tensor]:
    """``{name}.qweight``, ``{name}.qzeros``, ``{name}.scales`` of one solved linear."""
    codes = (result.q.to(torch.int32) + OFFSET).T.contiguous()  # [in, out]
    zeros = (result.zero.to(torch.int32) + OFFSET).T.contiguous()  # [groups, out]
    return {f"{name}.qweight": pack_columns(codes), f"{name}.qzeros": pack_columns(zeros),
            f"{name}.scales": result.scale.T.contiguous().to(torch.float16)}


def linear_specs(name: str, out_features: int, in_features: int, args: QuantArgs) -> list[TensorSpec]:
    groups = args.groups(in_features)
    return [TensorSpec(f"{name}.qweight", "I32", (in_features, out_features // PACK)),
            TensorSpec(f"{name}.qzeros", "I32", (groups, out_features // PACK)),
            TensorSpec(f"{name}.scales", "F16", (groups, out_features))]


def quantization_config(args: QuantArgs, ignore: list[str]) -> dict:
    """config.json's entry (AutoAWQ's keys; transformers' AwqConfig, vLLM AWQConfig.from_config)."""
    return {"quant_method": "awq", "bits": args.bits, "group_size": args.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": list(ignore)}
