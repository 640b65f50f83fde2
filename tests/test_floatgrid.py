"""FP8 E4M3 and NVFP4 (E2M1) weight grids against independent references: hand-checked E4M3
values (saturation, subnormals, round-to-nearest-even), a brute-force nearest search over a
written-out E2M1 table, per-block loops, and compressed-tensors' own FP4 packer."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from dist_quant.quant import floatgrid as fg

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX spec, E2M1 magnitudes by code


def test_fp8_cast_saturates_keeps_subnormals_and_rounds_to_even():
    x = torch.tensor([1e6, -1e6, 448.0, 464.0, 2.0 ** -9, 2.0 ** -10 * 1.5, 1.0 + 2.0 ** -4, 1.0 + 3 * 2.0 ** -4])
    got = fg.to_fp8(x).float()
    # 464 is the midpoint 448|480(not representable): saturates to 448; 2^-9 is E4M3's smallest
    # subnormal; 1.5·2^-10 rounds to 2^-9 (nearest); 1+1/16 is a tie between 1 and 1.125 → 1 (even);
    # 1+3/16 ties 1.125|1.25 → 1.25 (even mantissa)
    assert got.tolist() == [448.0, -448.0, 448.0, 448.0, 2.0 ** -9, 2.0 ** -9, 1.0, 1.25]
    assert not torch.isnan(got).any()


@pytest.mark.parametrize("strategy", ["channel", "tensor", "block"])
def test_fp8_scales_and_round_trip(strategy):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=g) * torch.linspace(0.01, 3, 300)
    scale = fg.fp8_scale(w, strategy)
    if strategy == "channel":
        ref = w.abs().amax(1, keepdim=True) / 448
    elif strategy == "tensor":
        ref = (w.abs().max() / 448).reshape(1)
    else:
        ref = torch.empty(math.ceil(200 / 128), math.ceil(300 / 128))
        for i, j in itertools.product(range(ref.shape[0]), range(ref.shape[1])):
            ref[i, j] = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().max() / 448
    torch.testing.assert_close(scale, ref, rtol=0, atol=0)
    q = fg.fp8_quantize(w, scale, strategy)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert q.float().abs().max() <= 448
    per_elem = fg.expand_fp8_scale(scale, tuple(w.shape), strategy)
    assert torch.equal(q.float(), (w / per_elem).to(torch.float8_e4m3fn).float())  # in range: plain cast
    err = (fg.fp8_dequantize(q, scale, strategy) - w).abs() / per_elem
    assert err.max() <= 16  # at most half an E4M3 step at the top binade (32 / 2) in scale units


def nearest_e2m1(v: float) -> int:
    """Brute force over the 16 codes: nearest value, ties to the even code (mantissa bit 0)."""
    best = None
    for code in range(16):
        val = (-1 if code & 8 else 1) * E2M1[code & 7]
        key = (abs(val - max(-6.0, min(6.0, v))), code & 1, code & 8 if v >= 0 else -(code & 8))
        if best is None or key < best[0]:
            best = (key, code)
    code = best[1]
    return 0 if code == 8 else code  # -0 is written as +0


def test_e2m1_codes_match_brute_force_including_ties():
    vals = [i / 8 for i in range(-64, 65)] + [7.0, -9.0, 0.24, 0.26, 5.0, 5.01, -2.5]
    got = fg.e2m1_codes(torch.tensor(vals)).tolist()
    assert got == [nearest_e2m1(v) for v in vals]
    assert fg.e2m1_values(torch.arange(16, dtype=torch.uint8)).tolist() == E2M1 + [-v for v in E2M1]


def test_fp4_packing_matches_compressed_tensors():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (8, 32), generator=g, dtype=torch.uint8)
    codes[codes == 8] = 0  # compressed-tensors writes -0 from the sign bit only; we write +0
    values = fg.e2m1_values(codes)
    assert torch.equal(fg.pack_e2m1(codes), pack_fp4_to_uint8(values))
    assert torch.equal(fg.unpack_e2m1(fg.pack_e2m1(codes)), codes)


def test_nvfp4_quantize_follows_the_published_rule():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=g) * 0.05
    codes, gscale, glob = fg.nvfp4_quantize(w)
    amax = w.abs().max()
    assert glob.dtype == torch.float32 and glob.item() == pytest.approx(448 * 6 / amax.item(), rel=1e-6)
    assert gscale.dtype == torch.float8_e4m3fn and gscale.shape == (16, 4)
    for r, k in itertools.product(range(16), range(4)):
        grp = w[r, k * 16:(k + 1) * 16]
        s = (grp.abs().max() / 6 * glob).clamp(max=448).to(torch.float8_e4m3fn)
        assert s.float() == gscale[r, k].float()
        eff = s.float() / glob
        assert codes[r, k * 16:(k + 1) * 16].tolist() == [nearest_e2m1(v) for v in (grp / eff).tolist()]
    deq = fg.nvfp4_dequantize(codes, gscale, glob)
    assert (deq - w).abs().max() <= (gscale.float() / glob).max() * 1.0 + 1e-6  # half of the widest step (2)
    with pytest.raises(ValueError, match="multiple of 16"):
        fg.nvfp4_quantize(torch.ones(4, 40))
