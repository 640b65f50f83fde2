"""Independent reference code for the tests: reading an output directory, our own int32
unpacker, round-to-nearest from the documented formulas, and the calibration activations of
layer 0. (Running the tool lives in ``tests/helpers.py``.)

Nothing here imports ``dist_quant``: the tests compare the tool against this code."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
QUANT_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# -- reading checkpoints ----------------------------------------------------------------------
def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: the files its ``model.safetensors.index.json``
    names, else every ``*.safetensors`` file (names must be unique)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = ([directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
             if index.is_file() else sorted(directory.glob("*.safetensors")))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():
                assert name not in out, f"{name} is in two files"
                out[name] = fh.get_tensor(name)
    return out


def part_file_contents(directory: Path) -> dict[str, list[str]]:
    contents = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            contents[f.name] = list(fh.keys())
    return contents


def header_data_bytes(path: Path) -> int:
    """Bytes of tensor data that a safetensors file's header declares."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def quantized_linears(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n[: -len(".weight_packed")] for n in tensors if n.endswith(".weight_packed"))


# -- our own unpacker and dequantization -------------------------------------------------------
def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Signed integers from the dense little-endian bit stream of ``packed`` along ``dim``:
    element ``i`` of a row occupies stream bits ``[i·bits, (i+1)·bits)``, stream bit ``k`` is
    bit ``k % 32`` of word ``k // 32``; stored values are offset by ``2^(bits-1)``."""
    assert packed.dtype == torch.int32 and packed.dim() == 2
    rows = packed if dim == 1 else packed.T
    words = rows.to(torch.int64) & 0xFFFFFFFF
    n_rows, n_words = words.shape
    assert n_words * 32 >= length * bits and (n_words - 1) * 32 < length * bits, (n_words, length, bits)
    stream = (words[:, :, None] >> torch.arange(32)) & 1  # [rows, words, 32], lowest bit first
    stream = stream.reshape(n_rows, n_words * 32)[:, : length * bits].reshape(n_rows, length, bits)
    values = (stream << torch.arange(bits)).sum(dim=-1) - (1 << (bits - 1))
    return values if dim == 1 else values.T


@dataclass
class QuantLinear:
    q: torch.Tensor  # int64 [out, in]
    scale: torch.Tensor  # [out, groups], as stored
    zero: torch.Tensor  # int64 [out, groups] (zeros when symmetric)
    shape: tuple[int, int]

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scale.shape[1]

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.group_size, dim=1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q − zero) · scale`` per group, in float32 (as a loader would)."""
        return ((self.q - self.expand(self.zero)).to(torch.float32) * self.expand(self.scale).float()).to(dtype)


def read_quant_linear(tensors: dict[str, torch.Tensor], name: str, bits: int) -> QuantLinear:
    shape = tuple(int(v) for v in tensors[name + ".weight_shape"].tolist())
    out_f, in_f = shape
    q = unpack_int32(tensors[name + ".weight_packed"], bits, in_f, dim=1)
    scale = tensors[name + ".weight_scale"]
    if name + ".weight_zero_point" in tensors:
        zero = unpack_int32(tensors[name + ".weight_zero_point"], bits, out_f, dim=0)
    else:
        zero = torch.zeros(scale.shape, dtype=torch.int64)
    assert q.shape == (out_f, in_f) and zero.shape == scale.shape
    return QuantLinear(q, scale, zero, shape)


def read_quant_linears(directory: Path, bits: int) -> tuple[dict[str, QuantLinear], dict[str, torch.Tensor]]:
    tensors = read_tensors(directory)
    return {n: read_quant_linear(tensors, n, bits) for n in quantized_linears(tensors)}, tensors


# -- reference round-to-nearest ----------------------------------------------------------------
def reference_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  scale_dtype: torch.dtype = torch.float32) -> QuantLinear:
    """RTN from the documented formulas (vectorized, float32 arithmetic)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out_f, in_f = w.shape
    cols = in_f if group_size == -1 else group_size
    g = w.float().reshape(out_f, in_f // cols, cols)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / ((qmax - qmin) / 2)
    else:
        scale = (hi.clamp(min=0) - lo.clamp(max=0)) / (qmax - qmin)
    scale = scale.clamp(min=torch.finfo(torch.float32).eps).to(scale_dtype).float()
    if symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = (qmin - torch.round(lo.clamp(max=0) / scale)).clamp(qmin, qmax)
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(qmin, qmax)
    return QuantLinear(q.reshape(out_f, in_f).long(), scale.to(scale_dtype), zero.long(), (out_f, in_f))


# -- layer-0 calibration activations -------------------------------------------------------------
def calibration_ids(model_dir: Path, calib: Path, num_samples: int, seq_len: int) -> torch.Tensor:
    """The first ``num_samples × seq_len`` tokens of the text file, as [num_samples, seq_len]."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(Path(calib).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    need = num_samples * seq_len
    assert len(ids) >= need
    return torch.tensor(ids[:need]).reshape(num_samples, seq_len)


def layer0_attn_input(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """``input_layernorm(embed(ids))`` of decoder layer 0 (RMSNorm), [tokens, hidden], float64."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    tensors = read_tensors(model_dir)
    x = tensors["model.embed_tokens.weight"].double()[ids.reshape(-1)]
    norm = tensors["model.layers.0.input_layernorm.weight"].double()
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + config["rms_norm_eps"])
    return x * norm


def relative_output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``‖X(W−Ŵ)ᵀ‖ / ‖XWᵀ‖`` (Frobenius)."""
    w, w_hat = w.double(), w_hat.double()
    return float((x @ (w - w_hat).T).norm() / (x @ w.T).norm())


def squared_output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖²``: the report's ``rel_output_error`` of a linear on inputs ``x``."""
    d = w.double() - w_hat.double()
    return float((x @ d.T).pow(2).sum() / (x @ w.double().T).pow(2).sum())


# -- FP8 E4M3 and NVFP4 (E2M1) by the published rules --------------------------------------------
F8 = torch.float8_e4m3fn
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX spec, E2M1 magnitudes by code


def fp8_cast(v: torch.Tensor) -> torch.Tensor:
    """torch's E4M3 cast (round to nearest even) after clamping to ±448 (the cast itself gives NaN)."""
    return v.clamp(-448, 448).to(F8).float()


def e2m1_table_decode(packed: torch.Tensor) -> torch.Tensor:
    """NVFP4 codes by the table: two codes a byte (even column in the low nibble), bit 3 the sign."""
    lo, hi = (packed & 0x0F).long(), (packed >> 4).long()
    codes = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)
    mag = torch.tensor(E2M1)[codes & 7]
    return torch.where(codes >= 8, -mag, mag)


def nvfp4_decode(t: dict[str, torch.Tensor], mod: str) -> torch.Tensor:
    """An NVFP4 reader: E2M1 by the table, two codes a byte (even column low), times
    weight_scale / weight_global_scale per group of 16 (compressed-tensors' ``dequantize``)."""
    packed = t[mod + ".weight_packed"]
    assert packed.dtype == torch.uint8
    scale = t[mod + ".weight_scale"].float() / t[mod + ".weight_global_scale"].float()
    return e2m1_table_decode(packed) * scale.repeat_interleave(16, dim=1)


def e2m1_nearest(r: torch.Tensor) -> torch.Tensor:
    """The nearest signed E2M1 value of ``r`` (clamped to ±6), exact ties to the even code."""
    grid = torch.tensor(E2M1 + [-e for e in E2M1])
    dist = (r.clamp(-6, 6)[..., None] - grid).abs()
    near = grid[dist.argmin(-1)]
    two = dist.topk(2, largest=False)
    tie = two.values[..., 0] == two.values[..., 1]
    if bool(tie.any()):
        idx = torch.tensor(list(range(8)) * 2)[two.indices]
        pick = torch.where(idx[..., 0] % 2 == 0, grid[two.indices[..., 0]], grid[two.indices[..., 1]])
        near = torch.where(tie, pick, near)
    return near


def nvfp4_rtn_reference(w: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """The published NVFP4 weight rule with the stored global scale ``gs`` (≈ 448·6/amax, checked
    apart): group scale fp8(max|group|/6·gs), the nearest E2M1 value of w / (group scale / gs)."""
    gs = gs.float().reshape(())
    g = w.float().reshape(w.shape[0], -1, 16)
    s = fp8_cast(g.abs().amax(-1, keepdim=True) / 6 * gs) / gs
    return (e2m1_nearest(g / torch.where(s > 0, s, torch.ones_like(s))) * s).reshape(w.shape)


def nvfp4_input_reference(x: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """NVFP4 input activations with the stored ``input_global_scale`` ``gs``: per token and group of
    16 the local scale fp8(max|group|/6·gs), the nearest E2M1 value of x / (local / gs)."""
    v = x.float().reshape(*x.shape[:-1], -1, 16)
    gs = float(gs)
    eff = fp8_cast(v.abs().amax(-1, keepdim=True) / 6 * gs) / gs
    return (e2m1_nearest(v / torch.where(eff > 0, eff, torch.ones_like(eff))) * eff).reshape(x.shape).to(x.dtype)


def relative_weight_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((w.double() - w_hat.double()).norm() / w.double().norm())


def assert_layers_match_model(model, ids: torch.Tensor, xs, atol: float, label: str = "",
                              rtol: float = 1e-4) -> None:
    """The pipeline's hidden states after each decoder layer (``xs``, one per layer) equal the
    transformers ``model``'s own on ``ids`` (its last hidden state carries the final norm)."""
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    n = len(xs)
    for i in range(n):
        got = xs[i].reshape(hs[0].shape)
        if i == n - 1:  # transformers applies the final norm to the last hidden state
            got, want = model.model.norm(got), hs[-1]
        else:
            want = hs[i + 1]
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=f"{label}layer {i}")


def assert_same_solution(a: QuantLinear, b: QuantLinear, min_equal: float, label: str = "",
                         scale_rtol: float = 1e-3) -> None:
    """Two GPTQ solutions of one linear that differ only in float reduction order (another
    device, rank count or thread count): at least ``min_equal`` of the integers equal, and at
    least ``min_equal`` of the groups' scales within ``scale_rtol``. Not a bound on ``|Δq|``:
    GPTQ feeds each rounding error to the later columns of its row, so one flip at a near-tie
    moves every later target of that row, and the MSE clip search can pick the neighbouring
    ratio of a group (bench/README.md, "GPU checks"); the quality of both solutions is compared
    by their output errors where the caller has them."""
    assert a.q.shape == b.q.shape and a.scale.shape == b.scale.shape, label
    equal = (a.q.long() == b.q.long()).float().mean().item()
    assert equal >= min_equal, (label, equal)
    sa, sb = a.scale.float(), b.scale.float()
    close = ((sa - sb).abs() <= scale_rtol * sb.abs() + 1e-9).float().mean().item()
    assert close >= min_equal, (label, close)


def assert_same_job(out_a: Path, out_b: Path, bits: int, min_equal: float = 0.99, error_rtol: float = 0.1) -> None:
    """Two outputs of one job whose arithmetic differs only in float order (another device or
    column kernel): layer 0's linears see the same inputs, so their solutions match as in
    :func:`assert_same_solution`; every later layer's inputs come from the already different
    quantized layers before it (the sequential calibration), so its integers can drift apart
    and only the quality is compared: each linear's reported relative output error within
    ``error_rtol`` of the other's."""
    a, _ = read_quant_linears(out_a, bits)
    b, _ = read_quant_linears(out_b, bits)
    assert a.keys() == b.keys() and a
    first = [n for n in a if ".layers.0." in n]
    assert first
    for name in first:
        assert_same_solution(a[name], b[name], min_equal, name)

    def errors(out: Path) -> dict[str, float]:
        report = json.loads((out / "quant_report.json").read_text())
        return {m: i["rel_output_error"] for layer in report["layers"] for m, i in layer["modules"].items()}

    ea, eb = errors(out_a), errors(out_b)
    assert ea.keys() == eb.keys()
    for m in ea:
        assert abs(eb[m] - ea[m]) <= error_rtol * ea[m] + 1e-12, (m, ea[m], eb[m])
