"""Typed, frozen run configuration.

Hydra composes YAML from ``conf/``; :func:`to_job_config` merges that onto the
structured schema below (unknown keys and ill-typed values are rejected by
OmegaConf) and builds these frozen dataclasses, whose ``__post_init__`` checks
the values and names the bad one in the error.
"""
from __future__ import annotations

import re
from decimal import Decimal
from dataclasses import dataclass, field
from typing import Any, Optional, Union


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and value."""


def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: Any, key: str = "size") -> int:
    """Parse ``123``, ``"500MB"``, ``"2GB"``, ``"1.5GiB"`` into bytes."""
    text = re.sub(r"(\d)\s+([A-Za-z])", r"\1\2", str(value).strip()).upper()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]I?B|B)?", text)
    _check(m is not None, key, value, "expected bytes or a size like 500MB, 2GB, 1GiB")
    number, unit = Decimal(m.group(1)), (m.group(2) or "")
    size = int(number * _SIZE_UNITS[unit])
    _check(size > 0, key, value, "must be positive")
    return size


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to quantize."""

    path: Optional[str] = None
    """Local HF checkpoint dir (config.json + safetensors). Empty: the embedded demo model."""
    dtype: str = "float32"
    """Compute dtype for the calibration forward passes (float32, bfloat16, float16)."""
    activation_dtype: Optional[str] = None
    """Dtype the calibration activations are held in between stages (null: model.dtype). bfloat16
    or float16 with model.dtype=float32 halves their memory while every batch is still computed
    in float32 (dist_quant/actdtype.py); dense layers and weight-only methods."""
    trust_remote_code: bool = False
    """Never executed by dist_quant; kept so that turning it on is an explicit, refused choice."""
    allow_pickle: bool = False
    """Allow .bin/.pt weights (loaded with torch.load(weights_only=True))."""

    def __post_init__(self) -> None:
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", self.dtype,
               "expected float32, bfloat16 or float16")
        _check(self.activation_dtype in (None, "float32", "bfloat16", "float16"), "model.activation_dtype",
               self.activation_dtype, "expected null, float32, bfloat16 or float16")


@dataclass(frozen=True)
class AutoRoundConfig:
    """``quant.autoround.*``: rounding / clipping tuning per decoder layer (``quant.method=autoround``,
    dist_quant/autoround_layer.py; defaults are auto-round 0.16's)."""

    iters: int = 200
    """Signed-gradient steps per decoder layer."""
    lr: Optional[float] = None
    """Learning rate of the rounding offsets (decays linearly to 0 over iters); null = 1 / iters."""
    minmax_lr: Optional[float] = None
    """Learning rate of the per-group clip factors; null = lr."""
    batch_size: int = 8
    """Calibration samples per step, over all ranks together (capped at calib.num_samples)."""
    minmax: bool = True
    """Tune the per-group clip factors of the range's min and max (false: rounding only)."""
    init: str = "rtn"
    """Starting point: rtn (offsets 0, factors 1: min/max round-to-nearest) or gptq (the offsets
    and factors that reproduce GPTQ's integers for the layer)."""
    seed: int = 0
    """Seed of the sample batches (the same on every rank)."""
    sampler: str = "stratified"
    """How a step's batch is drawn: stratified (one sample from each of batch_size contiguous
    strata: every rank gets batch / world samples of each batch) or shuffle (auto-round's
    IndexSampler: a shuffled order a batch at a time)."""

    def __post_init__(self) -> None:
        _check(not isinstance(self.iters, bool) and self.iters > 0, "quant.autoround.iters", self.iters,
               "must be a positive number of steps")
        for key, value in (("quant.autoround.lr", self.lr), ("quant.autoround.minmax_lr", self.minmax_lr)):
            _check(value is None or (not isinstance(value, bool) and value > 0), key, value,
                   "must be positive (or null for the default)")
        _check(not isinstance(self.batch_size, bool) and self.batch_size > 0, "quant.autoround.batch_size",
               self.batch_size, "must be positive")
        _check(self.init in ("rtn", "gptq"), "quant.autoround.init", self.init, "expected rtn or gptq")
        _check(self.sampler in ("stratified", "shuffle"), "quant.autoround.sampler", self.sampler,
               "expected stratified or shuffle")


@dataclass(frozen=True)
class FallbackConfig:
    """Sensitive linears kept in higher precision (docs/fallback.md): the ``max_linears`` with the
    largest relative output error in a sensitivity pre-pass, and every linear above ``threshold``."""

    max_linears: int = 0
    """N: keep the N linears of largest pre-pass error (their fused partners come along); 0: none."""
    threshold: Optional[float] = None
    """tau in (0, 1]: also keep every linear whose pre-pass relative output error exceeds it; null: off."""
    to: str = "float"
    """float (left unquantized) or w8 (int8 per-channel weights, same solver); also applies to
    quant.disable_names."""

    def __post_init__(self) -> None:
        n = self.max_linears
        _check(not isinstance(n, bool) and isinstance(n, int) and n >= 0, "quant.fallback.max_linears", n,
               "expected a number of linears >= 0")
        t = self.threshold
        if t is not None:
            _check(not isinstance(t, bool) and isinstance(t, (int, float)) and 0.0 < t <= 1.0,
                   "quant.fallback.threshold", t, "expected a relative output error in (0, 1], or null")
        _check(self.to in FALLBACK_TO, "quant.fallback.to", self.to, "expected " + " or ".join(FALLBACK_TO))

    @property
    def automatic(self) -> bool:
        return self.max_linears > 0 or self.threshold is not None


FALLBACK_TO = ("float", "w8")
GPTQ_KERNELS = ("auto", "torch", "triton", "numba")  # algorithms/gptq_triton.py, gptq_numba.py


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantization: algorithm and integer format."""

    method: str = "gptq"
    """gptq, rtn, or autoround (tunes each decoder layer's rounding and clipping; quant.autoround)."""
    bits: int = 4
    """Weight bits: 4 or 8."""
    group_size: int = 128
    """Input columns per scale; -1 means one scale per output channel."""
    symmetric: bool = True
    """Symmetric (no zero point) or asymmetric (with zero point)."""
    damp: float = 0.01
    """GPTQ dampening, as a fraction of mean(diag(H))."""
    block_size: int = 128
    """GPTQ lazy-batch block width (columns)."""
    act_order: bool = True
    """GPTQ: process columns by decreasing Hessian diagonal (group-aware: groups stay contiguous)."""
    observer: str = "minmax"
    """Scale choice: minmax, or mse (search a clipping ratio per group)."""
    mse_norm: float = 2.4
    """observer=mse: the error norm p of the search, Σ |fake_quantize(w) − w|^p (2.4: the GPTQ
    reference's; 2: squared error, a quarter of the search's cost)."""
    kernel: str = "auto"
    """GPTQ integer-grid column loop: auto (one fused Triton kernel per group on CUDA when the
    package triton is importable, one compiled numba call per sub-block on CPU when numba is,
    else torch ops), torch, triton or numba (the last two: an error where they cannot run)."""
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    """Modules left in float (lm_head is never quantized)."""
    moe_ignore: list[str] = field(default_factory=lambda: ["gate", "shared_expert_gate"])
    """MoE models only: linears also left in float (short or full names); by default the router
    (``mlp.gate`` / ``block_sparse_moe.gate``) and qwen2_moe's ``shared_expert_gate``."""
    name: str = "gptq_w4a16"
    """Preset name, for reports."""
    # -- W8A8 and smoothing (see dist_quant/smoothing.py) --------------------------------------
    weight_solver: Optional[str] = None
    """gptq or rtn: the weight solve of the W8A8 presets; when set it takes precedence over method."""
    act_bits: Optional[int] = None
    """Activation quantization: null (weights only, A16) or 8 (int8 activations, W8A8)."""
    act_dynamic: bool = False
    """int8 activations: false = static per-tensor asymmetric (scale and offset calibrated),
    true = dynamic per-token symmetric (scales computed at run time)."""
    smooth: str = "none"
    """Activation smoothing before the weight solve: none, smoothquant or flex_smooth."""
    alpha: Optional[float] = None
    """Smoothing exponent of the activation maxima, in [0, 1]. SmoothQuant: default 0.5.
    Flex smooth: null = searched (two-stage grid)."""
    beta: Optional[float] = None
    """Flex smooth: exponent of the weight maxima, in [0, 1]; null = searched (with alpha fixed
    when alpha is given)."""
    disable_anti_names: list[str] = field(default_factory=list)
    """Smoothing pairs to skip, named by a consumer linear: full name, a name suffix such as
    self_attn.o_proj, or an fnmatch pattern (model.layers.1?.mlp.down_proj)."""
    search_tokens: int = 1024
    """Flex smooth search: calibration tokens (over all ranks) that score each candidate."""
    # -- float formats: FP8 weights, FP8 activations (docs/float_formats.md) ---------------------
    weight_type: str = "int"
    """Weight number format: int (integers of quant.bits bits), fp8 (FP8 E4M3, quant.bits=8) or
    nvfp4 (FP4 E2M1 in groups of 16 with FP8 group scales and a global scale; quant.bits=4)."""
    weight_strategy: str = "channel"
    """FP8 weights: channel (a scale per output channel), tensor (one scale, shared by the parts
    a server fuses: q/k/v, gate/up) or block (a scale per 128×128 block; quant.group_size=128)."""
    act_type: str = "int"
    """Activations with quant.act_bits=8: int (int8) or fp8 (FP8 E4M3; per token when dynamic, per
    token and group of 128 columns with block weights, calibrated per tensor when static); with
    quant.act_bits=4: nvfp4 (calibrated global scale, group scales at run time)."""
    # -- AutoRound (quant.method=autoround) -----------------------------------------------------
    autoround: AutoRoundConfig = field(default_factory=AutoRoundConfig)
    """Tuning parameters of quant.method=autoround (docs/autoround.md)."""
    # -- KV-cache quantization (docs/kv_cache.md; dist_quant/kvcache.py) -----------------------
    kv_cache: Optional[str] = None
    """null (the KV cache stays in the serving dtype), fp8 (E4M3 scales in compressed-tensors'
    kv_cache_scheme: vLLM) or int8 (msModelSlim C8, MLA: FAKQuant; output.format=ascend). Static K and
    V scales calibrated on the attention's K (after RoPE) and V; combines with every preset."""
    kv_cache_strategy: str = "tensor"
    """tensor (one K and one V scale per layer) or head (one per KV head; compressed-tensors
    attn_head)."""
    # -- AWQ (quant.smooth=awq, preset awq_w4a16; see dist_quant/awq.py, docs/awq.md) ----------
    awq_grid: int = 20
    """AWQ scale search: grid points alpha = 0, 1/n, ..., (n-1)/n (AutoAWQ: 20)."""
    awq_duo_scaling: bool = True
    """AWQ scales mean|x|^alpha / w_mean^(1-alpha) (AutoAWQ's duo_scaling); false: mean|x|^alpha."""
    awq_clip: bool = True
    """AWQ clipping search after the scales are folded: per (row, group) range ratio 1.00 ... 0.55
    with the smallest output error on the calibration inputs (q/k projections are not clipped)."""
    # -- fallback of sensitive linears (docs/fallback.md) -----------------------------------------
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    """Automatic fallback: quant.fallback.max_linears / threshold / to."""
    disable_names: list[str] = field(default_factory=list)
    """Linears kept at quant.fallback.to precision by name: full name, a name suffix such as
    mlp.down_proj, or an fnmatch pattern (as quant.disable_anti_names); fused partners come along."""

    def __post_init__(self) -> None:
        _check_fallback(self)
        solvers = _solver_names()
        _check(self.weight_solver is None or self.weight_solver in solvers, "quant.weight_solver",
               self.weight_solver, "expected " + " or ".join(solvers))
        if self.weight_solver is not None:
            object.__setattr__(self, "method", self.weight_solver)
        _check_float_formats(self)
        _check_w8a8(self)
        methods = _method_names()
        _check(self.method in methods, "quant.method", self.method, "expected " + ", ".join(methods))
        _check(self.method != "autoround" or self.act_bits is None, "quant.method", self.method,
               "autoround tunes weight-only presets (A16); W8A8 jobs use quant.weight_solver=gptq or rtn")
        _check(self.method != "autoround" or self.weight_type == "int", "quant.method", self.method,
               f"autoround tunes integer weights; quant.weight_type={self.weight_type} needs gptq or rtn")
        _check(self.method != "autoround" or self.kv_cache is None, "quant.kv_cache", self.kv_cache,
               "is not calibrated by quant.method=autoround yet (its layer loop bypasses the attention hook); "
               "use gptq or rtn with a KV cache")
        _check_kv_cache(self)
        _check(self.bits in (4, 8), "quant.bits", self.bits, "supported weight bits are 4 and 8")
        _check(self.group_size == -1 or self.group_size > 0, "quant.group_size", self.group_size,
               "expected a positive group size or -1 (per-channel)")
        _check(0.0 < self.damp < 1.0, "quant.damp", self.damp, "expected 0 < damp < 1")
        _check(self.block_size > 0, "quant.block_size", self.block_size, "must be positive")
        _check(self.kernel in GPTQ_KERNELS, "quant.kernel", self.kernel, "expected " + ", ".join(GPTQ_KERNELS))
        _check(self.observer in ("minmax", "mse"), "quant.observer", self.observer,
               "expected minmax or mse")
        _check(1.0 <= self.mse_norm <= 8.0, "quant.mse_norm", self.mse_norm, "expected a norm p with 1 <= p <= 8")


def _check_fallback(q: "QuantConfig") -> None:
    for pattern in q.disable_names:
        _check(isinstance(pattern, str) and pattern.strip() != "", "quant.disable_names",
               list(q.disable_names), "expected non-empty module names or patterns")
    if q.fallback.to == "w8" and (q.fallback.automatic or q.disable_names):
        _check((q.bits == 4 and q.act_bits is None) or q.act_bits == 8, "quant.fallback.to", q.fallback.to,
               f"w8 fallback is written for 4-bit weight-only jobs (int8 weights) and W8A8 jobs (int8 weights "
               f"with float activations, W8A16); got quant.bits={q.bits}, quant.act_bits={q.act_bits}: "
               "use quant.fallback.to=float")


def _solver_names() -> tuple[str, ...]:
    """Keys of the solver registry (dist_quant/algorithms/registry.py)."""
    from .algorithms.registry import SOLVERS

    return tuple(SOLVERS)


def _method_names() -> tuple[str, ...]:
    """Every quant.method: the per-linear solvers and the layer solvers."""
    from .algorithms.registry import method_names

    return method_names()


def _smoother(name: str):
    from .algorithms.registry import SMOOTHERS

    return SMOOTHERS[name]


def _smooth_methods() -> tuple[str, ...]:
    from .algorithms.registry import smooth_methods

    return smooth_methods()


def _output_formats() -> tuple[str, ...]:
    from .formats.registry import FORMATS

    return tuple(FORMATS)


FP8_BLOCK = 128  # vLLM's block FP8 kernels: 128×128 weight blocks, 1×128 activation groups


def _check_float_formats(q: "QuantConfig") -> None:
    """FP8 weights (quant.weight_type=fp8) and FP8 activations (quant.act_type=fp8) and how they
    combine: FP8_DYNAMIC / FP8 (static) / FP8_BLOCK, and W4AFP8 (int4 weights, FP8 activations)."""
    _check(q.weight_type in ("int", "fp8", "nvfp4"), "quant.weight_type", q.weight_type,
           "expected int, fp8 or nvfp4")
    _check(q.act_type in ("int", "fp8", "nvfp4"), "quant.act_type", q.act_type, "expected int, fp8 or nvfp4")
    if q.weight_type == "nvfp4" or q.act_type == "nvfp4":  # NVFP4A16 / NVFP4 (W4A4)
        _check(q.weight_type == "nvfp4" and q.bits == 4 and q.group_size == 16 and q.symmetric
               and q.observer == "minmax", "quant.weight_type", q.weight_type,
               f"NVFP4 needs quant.weight_type=nvfp4, bits=4, group_size=16, symmetric, observer=minmax (got "
               f"weight_type={q.weight_type}, bits={q.bits}, group_size={q.group_size}, symmetric={q.symmetric}, "
               f"observer={q.observer})")
        _check(q.act_bits is None or (q.act_bits == 4 and q.act_type == "nvfp4" and not q.act_dynamic),
               "quant.act_bits", q.act_bits, "NVFP4 weights take float activations (null) or NVFP4 ones "
               "(quant.act_bits=4, quant.act_type=nvfp4, quant.act_dynamic=false: a calibrated global scale)")
        _check(q.smooth == "none", "quant.smooth", q.smooth, "NVFP4 uses quant.smooth=none")
        return
    _check(q.weight_strategy in ("channel", "tensor", "block"), "quant.weight_strategy", q.weight_strategy,
           "expected channel, tensor or block")
    if q.weight_type == "fp8":
        _check(q.bits == 8, "quant.bits", q.bits, "FP8 weights are 8-bit (quant.weight_type=fp8)")
        _check(q.symmetric, "quant.symmetric", q.symmetric, "FP8 weights are symmetric (no zero point)")
        _check(q.observer == "minmax", "quant.observer", q.observer, "FP8 scales are max|w| / 448 (minmax)")
        want = FP8_BLOCK if q.weight_strategy == "block" else -1
        _check(q.group_size == want, "quant.group_size", q.group_size,
               f"FP8 {q.weight_strategy} weights need quant.group_size={want}")
        _check(q.act_bits == 8 and q.act_type == "fp8", "quant.weight_type", q.weight_type,
               "FP8 weights are written with FP8 activations (quant.act_bits=8, quant.act_type=fp8)")
        if q.weight_strategy == "block":
            _check(q.act_dynamic, "quant.act_dynamic", q.act_dynamic, "block FP8 activations are dynamic per "
                   "token and group of 128 (vLLM's CompressedTensorsW8A8Fp8 asserts a dynamic input scheme)")
    elif q.act_type == "fp8" and q.act_bits == 8:  # W4AFP8: vLLM CompressedTensorsW4A8Fp8
        _check(q.bits == 4 and q.group_size == 128 and q.symmetric, "quant.act_type", q.act_type,
               f"int weights with FP8 activations (W4AFP8) need int4 symmetric weights in groups of 128 "
               f"(vLLM's W4A8-FP8 kernels; got bits={q.bits}, group_size={q.group_size}, symmetric={q.symmetric})")
        _check(q.act_dynamic, "quant.act_dynamic", q.act_dynamic, "W4AFP8 activations are dynamic per token")
    if q.act_type == "fp8":
        _check(q.act_bits == 8, "quant.act_type", q.act_type, "needs quant.act_bits=8")
        _check(q.smooth == "none", "quant.smooth", q.smooth, "smoothing is written for int8 activations; "
               "FP8 activations use quant.smooth=none")


def _check_w8a8(q: "QuantConfig") -> None:
    """Activation quantization and smoothing keys (and how they combine)."""
    _check(q.act_bits in (None, 8) or q.act_type == "nvfp4", "quant.act_bits", q.act_bits,
           "expected null (no activation quantization) or 8")
    if q.act_bits == 8 and q.act_type == "int":
        _check_int8_activation_weights(q)
    methods = _smooth_methods()
    _check(q.smooth in methods, "quant.smooth", q.smooth, "expected " + ", ".join(methods))
    if q.smooth != "none" and _smoother(q.smooth).weight_only:
        _check(q.act_bits is None, "quant.smooth", q.smooth, "AWQ scales are chosen for weight-only "
               f"quantization; leave activations float (quant.act_bits=null, got {q.act_bits})")
    elif q.smooth != "none":
        _check(q.act_bits == 8, "quant.smooth", q.smooth, "smoothing moves outliers from activations "
               "into weights and is only useful with int8 activations (quant.act_bits=8)")
    _check(not isinstance(q.awq_grid, bool) and q.awq_grid >= 1, "quant.awq_grid", q.awq_grid,
           "expected a positive number of grid points")
    for key, value in (("quant.alpha", q.alpha), ("quant.beta", q.beta)):
        if value is None:
            continue
        _check(not isinstance(value, bool) and isinstance(value, (int, float)), key, value, "expected a number")
        _check(0.0 <= value <= 1.0, key, value, "expected a value in [0, 1]")
        _check(q.smooth != "none", key, value, "has no effect without smoothing (quant.smooth=none)")
    if q.smooth == "smoothquant":
        _check(q.beta is None, "quant.beta", q.beta, "is a flex_smooth parameter; SmoothQuant uses "
               "beta = 1 - alpha (leave quant.beta null)")
    if q.smooth == "awq":
        _check(q.beta is None, "quant.beta", q.beta, "is a flex_smooth parameter; AWQ searches alpha only "
               "(leave quant.beta null)")
    if q.smooth == "flex_smooth" and q.alpha is None:
        _check(q.beta is None, "quant.beta", q.beta, "given without quant.alpha: give both, only alpha "
               "(beta searched), or neither (both searched)")
    _check(not isinstance(q.search_tokens, bool) and q.search_tokens > 0, "quant.search_tokens",
           q.search_tokens, "must be positive")
    for pattern in q.disable_anti_names:
        _check(isinstance(pattern, str) and pattern.strip() != "", "quant.disable_anti_names",
               list(q.disable_anti_names), "expected non-empty module names or patterns")


def _check_int8_activation_weights(q: "QuantConfig") -> None:
    """The weights int8 activations combine with: int8 per channel (W8A8) or int4 per channel or
    per group with dynamic per-token activations (W4A8: compressed-tensors CompressedTensorsW4A8Int,
    symmetric weights, no zero point); both symmetric."""
    if q.bits == 4:
        _check(q.symmetric and q.act_dynamic, "quant.act_bits", q.act_bits, "W4A8 needs symmetric int4 weights "
               "and dynamic per-token activations (quant.symmetric=true, quant.act_dynamic=true; got "
               f"symmetric={q.symmetric}, act_dynamic={q.act_dynamic})")
        _check(q.smooth == "none", "quant.smooth", q.smooth, "smoothing is written for W8A8 (8-bit weights); "
               "W4A8 runs without it (quant.smooth=none)")
        return
    _check(q.bits == 8 and q.group_size == -1 and q.symmetric, "quant.act_bits", q.act_bits,
           f"W8A8 needs int8 per-channel symmetric weights (quant.bits=8, quant.group_size=-1, "
           f"quant.symmetric=true; got bits={q.bits}, group_size={q.group_size}, symmetric={q.symmetric})")


def _check_kv_cache(q: "QuantConfig") -> None:
    """quant.kv_cache / quant.kv_cache_strategy (the output format is checked by the job:
    :func:`_check_kv_cache_format`)."""
    _check(q.kv_cache in (None, "fp8", "int8"), "quant.kv_cache", q.kv_cache,
           "expected null (no KV-cache quantization), fp8 or int8")
    _check(q.kv_cache_strategy in ("tensor", "head"), "quant.kv_cache_strategy", q.kv_cache_strategy,
           "expected tensor or head")


def _check_kv_cache_format(job: "JobConfig") -> None:
    """Which server caches which kind: vLLM's quantized KV cache is FP8 (an int8
    compressed-tensors kv_cache_scheme would be read as FP8 scales); vLLM-Ascend's is int8 C8."""
    kv, fmt = job.quant.kv_cache, job.output.format
    _check(kv != "int8" or fmt == "ascend", "quant.kv_cache", kv, f"an int8 KV cache is Ascend's C8 "
           f"(output.format=ascend); vLLM quantizes the KV cache to fp8 (output.format={fmt}: use fp8)")
    _check(kv != "fp8" or fmt != "ascend", "quant.kv_cache", kv, "vLLM-Ascend's quantized KV cache is int8 "
           "(C8); use quant.kv_cache=int8 with output.format=ascend")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data."""

    path: Optional[str] = None
    """Calibration file or dataset folder (see calib.format). Empty: built-in demo text."""
    format: str = "auto"
    """auto, text, jsonl, chat, dataset, ids or safetensors (docs/calibration.md). auto: a folder,
    .parquet or .arrow → dataset; .safetensors → safetensors; .jsonl → ids / chat / jsonl by its
    first record (input_ids / messages / other); anything else → text."""
    chat_template: Optional[str] = None
    """Chat records: a Jinja chat template (or a file holding one) instead of the tokenizer's own."""
    smooth_path: Optional[str] = None
    """A separate calibration set for the smoothing statistics and search (msModelSlim's
    anti_calib_file), read like calib.path. Empty: smoothing uses the calibration set."""
    smooth_num_samples: Optional[int] = None
    """Samples drawn from calib.smooth_path. Empty: calib.num_samples."""
    num_samples: int = 128
    """Calibration samples (all ranks together; each rank takes its slice)."""
    seq_len: int = 512
    """Tokens per calibration sample."""
    batch_size: int = 8
    """Samples per forward batch (per rank)."""
    text_field: str = "text"
    """JSONL field / dataset column holding the text (a dataset column of chat messages works too)."""
    all_experts: bool = False
    """MoE: also run every token through every expert for the statistics only (every expert gets
    a Hessian of all tokens); the propagated outputs still follow the model's routing."""
    min_expert_tokens: int = 128
    """MoE: an expert routed fewer tokens than this (and always one routed none) gets ``expert_fallback``."""
    expert_fallback: str = "all_tokens"
    """MoE: all_tokens (statistics of all tokens for that expert) or rtn (round-to-nearest)."""

    def __post_init__(self) -> None:
        _check(self.min_expert_tokens >= 0, "calib.min_expert_tokens", self.min_expert_tokens, "must be >= 0")
        _check(self.expert_fallback in ("all_tokens", "rtn"), "calib.expert_fallback", self.expert_fallback,
               "expected all_tokens or rtn")
        _check(self.num_samples > 0, "calib.num_samples", self.num_samples, "must be positive")
        from .calib_sources.base import SOURCES  # the registry (filled by importing dist_quant.calib_sources)
        from . import calib_sources  # noqa: F401

        _check(self.format == "auto" or self.format in SOURCES, "calib.format", self.format,
               "expected auto or one of " + ", ".join(SOURCES))
        _check(self.smooth_num_samples is None or self.smooth_num_samples > 0, "calib.smooth_num_samples",
               self.smooth_num_samples, "must be positive")
        _check(self.seq_len > 1, "calib.seq_len", self.seq_len, "must be at least 2")
        _check(self.batch_size > 0, "calib.batch_size", self.batch_size, "must be positive")


OUTPUT_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class OutputConfig:
    """Where and how the quantized checkpoint is written."""

    dir: Optional[str] = None
    """Output directory (created atomically). Empty: <model dir name>-<quant name> under ./outputs."""
    format: str = "compressed-tensors"
    """compressed-tensors (vLLM, SGLang, transformers) or ascend (msModelSlim description format:
    MindIE, vLLM-Ascend)."""
    part_file_size: str = "2GB"
    """Largest safetensors part file: bytes or a size like 500MB, 2GB."""
    overwrite: bool = False
    """Replace an existing non-empty output directory."""
    dtype: str = "auto"
    """Serving dtype (the dtype the server runs the model in): auto (the checkpoint's), bfloat16,
    float16 or float32. Scales are rounded to it and stored in it; Ascend's deq_scale encoding
    follows it (int64 bits for float16); config.json's torch_dtype names it."""

    def __post_init__(self) -> None:
        formats = _output_formats()
        _check(self.format in formats, "output.format", self.format, "supported formats: " + ", ".join(formats))
        _check(self.dtype in OUTPUT_DTYPES, "output.dtype", self.dtype,
               "choose one of " + ", ".join(OUTPUT_DTYPES))
        parse_size(self.part_file_size, "output.part_file_size")

    @property
    def part_file_bytes(self) -> int:
        return parse_size(self.part_file_size, "output.part_file_size")


@dataclass(frozen=True)
class RuntimeConfig:
    """Devices, process group and logging."""

    device: str = "auto"
    """auto, cpu, cuda or npu."""
    backend: str = "auto"
    """auto, gloo, nccl or hccl."""
    world_size: Optional[int] = None
    """Only for dry_run: plan for this many ranks without starting them."""
    timeout_s: int = 1800
    """Collective timeout: a dead or stuck rank ends the job after this long."""
    run_dir: Optional[str] = None
    """Run directory for logs (shared by all ranks). Empty: runs/<timestamp>, chosen by rank 0."""
    threads: int = 0
    """torch intra-op threads per rank; 0: cores / local ranks."""
    prefetch: bool = True
    """Read the next layer's tensors from disk into the page cache in a background thread while
    the current layer computes (no extra process memory: the pages are the kernel's cache)."""
    activation_budget: Optional[str] = None
    """Bytes (500MB, 8GB, ...) a closing stage's inputs (down_proj's act(gate)·up, o_proj's
    attention output) may take on a rank when they are wider than the branch input: above it the
    stage streams them, one batch at a time, computing each batch twice (for the statistics,
    then with the solved weights) instead of holding all of the rank's samples. Same output bits.
    Empty: never stream."""

    heap: str = "trim"
    """Host heap between stages (dist_quant/memory.py): trim (malloc_trim once per layer: the lowest
    peak RSS; with the huge pages the command starts with, the pages it grows back are cheap) or
    keep (freed batches stay in the process for the next stage: fewest page faults, higher RSS)."""
    offload: str = "auto"
    """Where a rank's calibration activations live on an accelerator (dist_quant/offload.py): auto
    (pinned host memory, streamed to the device one batch at a time, when the residual stream
    exceeds runtime.activation_budget; never on CPU or without a budget), host (always; on CPU a
    plain copy, for testing), none (on the device)."""

    @property
    def activation_budget_bytes(self) -> Optional[int]:
        if self.activation_budget is None:
            return None
        return parse_size(self.activation_budget, "runtime.activation_budget")

    def __post_init__(self) -> None:
        if self.activation_budget is not None:
            parse_size(self.activation_budget, "runtime.activation_budget")
        _check(self.heap in ("keep", "trim"), "runtime.heap", self.heap, "expected keep or trim")
        _check(self.offload in ("auto", "host", "none"), "runtime.offload", self.offload,
               "expected auto, host or none")
        _check(self.device in ("auto", "cpu", "cuda", "npu"), "runtime.device", self.device,
               "expected auto, cpu, cuda or npu")
        _check(self.backend in ("auto", "gloo", "nccl", "hccl"), "runtime.backend", self.backend,
               "expected auto, gloo, nccl or hccl")
        _check(self.world_size is None or self.world_size > 0, "runtime.world_size",
               self.world_size, "must be positive")
        _check(self.timeout_s > 0, "runtime.timeout_s", self.timeout_s, "must be positive")
        _check(self.threads >= 0, "runtime.threads", self.threads, "must be >= 0")


@dataclass(frozen=True)
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    dry_run: bool = False
    """Print the plan (from config + safetensors headers only) and stop."""
    resume: Union[bool, str] = False
    """true: continue the interrupted run of this output.dir (its state is kept in
    <output.dir>.partial) after its last completed layer; auto: continue it when it exists,
    start fresh otherwise; false: start fresh. A run that differs (model, config, world size,
    calibration tokens) is refused."""
    seed: int = 0
    """Seed of every random choice (calibration subsets of the smoothing search, the draw from a
    calibration dataset)."""

    def __post_init__(self) -> None:
        resume = self.resume
        if isinstance(resume, str) and resume.strip().lower() in ("true", "false", "auto"):
            resume = {"true": True, "false": False, "auto": "auto"}[resume.strip().lower()]
        _check(resume is True or resume is False or resume == "auto", "resume", self.resume,
               "expected true, false or auto")
        object.__setattr__(self, "resume", resume)
        _check(resume is False or self.quant.method != "autoround", "resume", self.resume,
               "is not supported with quant.method=autoround yet (the float chain's activations are not "
               "saved with the layer checkpoints); run with resume=false")
        q = self.quant
        _check(q.fallback.to == "float" or q.weight_type == "int", "quant.fallback.to", q.fallback.to,
               f"int8 fallback linears need integer weights; quant.weight_type={q.weight_type} falls back to float")
        _check(q.method != "autoround" or not (q.fallback.automatic or q.disable_names), "quant.method", q.method,
               "autoround does not take quant.fallback / quant.disable_names yet; use gptq or rtn")
        _check(q.kv_cache is None or not q.fallback.automatic, "quant.kv_cache", q.kv_cache,
               "is not combined with the automatic fallback pre-pass yet (quant.fallback.max_linears / threshold); "
               "quant.disable_names works")
        _check(self.quant.fallback.to != "w8" or self.quant.act_bits is None or self.output.format == "ascend",
               "quant.fallback.to", self.quant.fallback.to, "W8A16 fallback linears in a W8A8 job are written in "
               "the Ascend description format only (output.format=ascend): vLLM's compressed-tensors loader has no "
               "int8 weight-only scheme inside an int-quantized checkpoint")
        _check(self.calib.smooth_path is None or self.quant.smooth != "none", "calib.smooth_path",
               self.calib.smooth_path, "has no effect without smoothing (quant.smooth=none)")
        _check_kv_cache_format(self)
