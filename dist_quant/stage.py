"""The stage API: what a layer program (dist_quant/arch/<family>.py) uses to quantize one
decoder layer in the one-pass order.

A program is ordinary code that reads like the layer's forward. Wherever a group of
linears meets its true input, it calls :meth:`StageContext.quantize`, which runs the
stage hooks (smoothing, activation quantization), then capture → reduce → solve →
broadcast → write, and returns the inputs as the quantized linears see them; after that
the layer's modules hold the quantized (dequantized) weights, so the program continues
the forward with them::

    def attention(ctx, xs):                       # xs: this rank's hidden states, per batch
        attn, norm = ctx.module("self_attn"), ctx.module("input_layernorm")
        core = lambda h: ctx.input_of(attn, "o_proj", h, position_embeddings=ctx.pos_emb)
        hs = ctx.quantize(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                          lambda: [norm(x) for x in xs],       # a callable: smoothing may refold
                          downstream=lambda hs: [core(h) for h in hs])  # v→o smoothing input
        a = ctx.quantize(["self_attn.o_proj"], [core(h) for h in hs])
        return [x + ctx.run("self_attn.o_proj", y) for x, y in zip(xs, a)]

Public pieces (names are relative to the decoder layer, in checkpoint spelling, or full):

* ``ctx.module(name)``, ``ctx.tensor(name)``, ``ctx.weight(name)``: a submodule; a tensor
  (smoothing overrides first, then the checkpoint); a weight as float32 on the device.
* ``ctx.quantize(linears, inputs, downstream=None)``: the collective stage (above).
  ``linears`` are names (those the plan leaves in float are skipped) or a stage name of
  the architecture's table; every rank must call it with the same linears.
* ``ctx.run(name, x)``: the linear with its quantized weight.
* ``ctx.input_of(module, child, ...)`` / ``ctx.inputs_of(module, [children], ...)``: run a
  module of the model (its own forward) and get what a child linear receives: with the
  child replaced by identity, or captured by hooks (the forward stops once all are seen).
* ``ctx.act(name, x)``: what linear ``name`` sees of ``x`` (int8 fake-quantized in W8A8
  jobs, else ``x``).
* ``ctx.solve(linears, H, tokens, weights=None, method=None)`` and ``ctx.write(linear,
  result)``: the local pieces of ``quantize`` for work that is not one collective stage
  (MoE experts, solved by their owner from the tokens routed to it; see arch/moe_block.py).
* Lanes (``calib.smooth_path``): the batches of a layer are this rank's calibration batches,
  then its batches of the separate smoothing set, carried through the layer alongside them (the
  programs run every batch alike). ``ctx.masks`` are the real tokens of all batches (what the
  forward uses), ``ctx.calib_masks`` those of the calibration lane only (the solve's statistics:
  ``quantize`` captures with them) and ``ctx.smooth_masks`` those of the smoothing lane only (the
  smoothing / AWQ statistics and searches); without a smoothing set all three are the same.
* ``ctx.comm`` (collectives, dist_quant/runtime.py), ``ctx.index``, ``ctx.masks``,
  ``ctx.record`` (the layer's report record), ``ctx.phase(name)`` (time a phase),
  ``ctx.pos_emb`` (rotary embeddings of the calibration positions).

Hooks (``StageHook``) run inside ``quantize`` before the statistics are taken; W8A8
smoothing (dist_quant/smoothing.py) and activation quantization are the two there are.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence, Union

import torch
from torch import nn

from .algorithms.gptq import GPTQParams
from .algorithms.registry import get_solver, solver_params
from . import offload
from .numerics import check_result, check_weight
from .plan import LinearInfo
from .quant import floatgrid as fg
from .quant.activations import ActQuantArgs, StaticActParams, fake_quant
from .quant.qparams import QuantResult
from .solver_threads import single_threaded, solve_workers
from .stats import DEQUANT_ROWS, HessianStat, error_ratio, quantized_output_error

log = logging.getLogger("dist_quant")

Inputs = Union[Sequence[torch.Tensor], Callable[[], list]]


class StageHook(Protocol):
    """Runs inside :meth:`StageContext.quantize` before the statistics of ``linears`` are
    taken; returns the (possibly refolded / fake-quantized) inputs."""

    def before_solve(self, ctx: "StageContext", linears: list[LinearInfo], inputs: list[torch.Tensor],
                     make_inputs: Callable[[], list] | None,
                     downstream: Callable[[list], list] | None) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class Lanes:
    """The batches of a job with a separate smoothing set (calib.smooth_path): ``main`` batches
    of the calibration set first, then the smoothing set's on this rank."""

    main: int  # this rank's calibration batches (the first ones)
    smooth_samples: int  # samples of the smoothing set, all ranks together
    smooth_offset: int  # index of this rank's first smoothing-set sample

    def split(self, masks: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(calibration-lane masks, smoothing-lane masks)``: each with the other lane's
        batches all False."""
        none = [torch.zeros_like(m) for m in masks]
        return masks[:self.main] + none[self.main:], none[:self.main] + masks[self.main:]


@dataclass
class Job:
    """What stays the same for every layer of a job (built once by the pipeline)."""

    cfg: Any  # JobConfig
    comm: Any  # runtime.Comm
    ckpt: Any  # checkpoint.Checkpoint
    plan: Any  # plan.ModelPlan
    owners: Any  # plan.OwnerPlan
    args: Any  # quant.qparams.QuantArgs
    device: torch.device
    writer: Any  # writer.RankWriter
    fmt: Any  # formats.registry.OutputFormat
    dtype: torch.dtype
    hooks: list = field(default_factory=list)
    pos_emb: tuple | None = None
    act_params: dict[str, StaticActParams | None] = field(default_factory=dict)  # linear → input quantizer
    weight_amax: dict[str, float] = field(default_factory=dict)  # linear → fused max|w| (NVFP4 global scale)
    notes: set = field(default_factory=set)  # keys of one-time log messages already given
    check_stop: Callable[[int], None] | None = None  # resume.Progress.check_stop (dist_quant/stop.py)
    clip: Callable | None = None  # AWQ clipping search: (linears, weights, H, args) -> ratios or None (awq.py)
    lanes: Lanes | None = None  # calib.smooth_path: the smoothing set's batches follow the calibration set's
    cast: Any = None  # actdtype.StorageCast when activations are held in another dtype than computed in
    offload: torch.device | None = None  # the device whose batches are held in host memory (offload.py)
    _params: dict = field(default_factory=dict, repr=False)  # solver name → its frozen params

    @property
    def act(self) -> ActQuantArgs | None:
        return getattr(self.fmt, "act", None)

    @property
    def kv(self):
        """The KV-cache quantizer (dist_quant/kvcache.KVCacheArgs), None when the cache stays float."""
        return getattr(self.fmt, "kv", None)

    def solver_params(self, method: str):
        """The frozen parameters of solver ``method`` for this job (built once)."""
        if method not in self._params:
            self._params[method] = solver_params(method, self.cfg.quant)
        return self._params[method]


class _NoPhase:
    def __call__(self, name: str):
        return contextlib.nullcontext()


def input_of(module: nn.Module, child: str, *args, **kwargs) -> torch.Tensor:
    """``module(*args, **kwargs)`` with ``module.<child>`` replaced by identity: the input of
    that child (e.g. attention without o_proj gives o_proj's input). Tuple outputs (attention
    returns ``(out, weights)``) give their first element."""
    original = getattr(module, child)
    setattr(module, child, nn.Identity())
    try:
        out = module(*args, **kwargs)
    finally:
        setattr(module, child, original)
    return out[0] if isinstance(out, tuple) else out


class _AllSeen(Exception):
    """Raised inside a forward once every requested input has been captured (stops it early)."""


def inputs_of(module: nn.Module, children: Sequence[str], *args, **kwargs) -> dict[str, torch.Tensor]:
    """Run ``module(*args, **kwargs)`` and return the first positional input of each named
    submodule (dotted names relative to ``module``), stopping the forward as soon as all were
    seen: the true inputs of linears inside a module whose forward the program does not
    rewrite (e.g. ``q_b_proj`` after ``q_a_layernorm`` in MLA attention)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def grab(mod, inputs):
            seen.setdefault(name, inputs[0])
            if len(seen) == len(children):
                raise _AllSeen
        return grab

    for name in children:
        handles.append(module.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        module(*args, **kwargs)
    except _AllSeen:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in children if name not in seen]
    if missing:
        raise RuntimeError(f"the forward of {type(module).__name__} never reached {missing}")
    return seen


def _shares_amax(args) -> bool:
    """The weight scale depends on max|w| of the fused parts together (FP8 tensor, NVFP4 global)."""
    return (args.grid == "fp8" and args.fp8_strategy == "tensor") or args.grid == "nvfp4"


class StageContext:
    """One decoder layer of one job, as seen by its layer program (see the module docstring)."""

    # routed experts' Hessians are captured for their solves (False in the fallback pre-pass,
    # dist_quant/fallback.py, which solves no expert)
    expert_statistics = True

    def __init__(self, job: Job, layer: nn.Module, index: int, masks: list[torch.Tensor], record, phase=None):
        self.job, self.layer, self.index, self.masks, self.record = job, layer, index, masks, record
        self.phase = phase if phase is not None else _NoPhase()
        self.arch = job.plan.arch
        self.prefix = self.arch.layer_prefix(index)
        self.overrides: dict[str, torch.Tensor] = {}  # checkpoint tensors changed in this layer (smoothing)
        self._linears = {lin.name: lin for lin in job.plan.layer_linears(index)}
        lanes = job.lanes
        self.calib_masks, self.smooth_masks = lanes.split(masks) if lanes is not None else (masks, masks)
        self._order = {name: k for k, name in enumerate(self._linears)}

    # -- facts -------------------------------------------------------------------------------
    @property
    def comm(self):
        return self.job.comm

    @property
    def cfg(self):
        return self.job.cfg

    @property
    def config(self) -> dict:
        return self.job.ckpt.config

    @property
    def device(self) -> torch.device:
        return self.job.device

    @property
    def dtype(self) -> torch.dtype:
        return self.job.dtype

    @property
    def args(self):
        return self.job.args

    def args_of(self, lin: LinearInfo):
        """The weight format of ``lin``: the job's, or int8 per channel for a ``w8`` fallback."""
        if lin.fallback is None:
            return self.job.args
        from .fallback import linear_args

        return linear_args(self.job.args, lin)

    @property
    def pos_emb(self):
        return self.job.pos_emb

    def fqn(self, name: str) -> str:
        """Full checkpoint name of ``name`` (relative to the layer, or already full)."""
        return name if name.startswith(self.prefix) else self.prefix + name

    def rel(self, name: str) -> str:
        return name[len(self.prefix):] if name.startswith(self.prefix) else name

    def owner(self, name: str) -> int:
        return self.job.owners.owner[self.fqn(name)]

    def linear(self, name: str) -> LinearInfo | None:
        """The plan's entry of a quantized linear (None when it stays float)."""
        return self._linears.get(self.fqn(name))

    def linears(self, stage: str | None = None) -> list[LinearInfo]:
        """This layer's quantized linears (of one stage of the architecture's table)."""
        return [lin for lin in self._linears.values() if stage is None or lin.stage == stage]

    def once(self, key: str) -> bool:
        """True the first time ``key`` is seen in this job (for one-time messages)."""
        if key in self.job.notes:
            return False
        self.job.notes.add(key)
        return True

    # -- reading ----------------------------------------------------------------------------
    def module(self, name: str) -> nn.Module:
        """The submodule of the layer holding checkpoint name ``name``."""
        return self.layer.get_submodule(self.arch.memory_name(self.rel(name)))

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor of the layer as the output must hold it: overrides first, then the checkpoint."""
        fqn = self.fqn(name)
        t = self.overrides.get(fqn)
        return t if t is not None else self.job.ckpt.get(fqn)

    def has(self, name: str) -> bool:
        fqn = self.fqn(name)
        return fqn in self.overrides or fqn in self.job.ckpt

    def weight(self, name: str) -> torch.Tensor:
        """``<name>.weight`` as float32 on the device."""
        return self.tensor(self.fqn(name) + ".weight").to(self.device, torch.float32)

    def set_tensor(self, name: str, value: torch.Tensor, module_attr: tuple[nn.Module, str] | None = None) -> None:
        """Override a checkpoint tensor of this layer (what the output and the solve read),
        and copy it into the in-memory module parameter ``module_attr`` when given."""
        self.overrides[self.fqn(name)] = value
        if module_attr is not None:
            module, attr = module_attr
            getattr(module, attr).data.copy_(value.to(getattr(module, attr).dtype))

    # -- running ----------------------------------------------------------------------------
    def run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Linear ``name`` on ``x`` with its quantized weight (its float weight when the plan
        leaves it in float)."""
        return self.module(name)(x)

    def input_of(self, module: nn.Module, child: str, *args, **kwargs) -> torch.Tensor:
        cast = self.job.cast
        if cast is None:
            return input_of(module, child, *args, **kwargs)
        with cast.outermost():
            return cast.down(input_of(module, child, *args, **kwargs))

    def inputs_of(self, module: nn.Module, children: Sequence[str], *args, **kwargs) -> dict[str, torch.Tensor]:
        cast = self.job.cast
        if cast is None:
            return inputs_of(module, children, *args, **kwargs)
        with cast.outermost():  # the forward stops by an exception once all are seen
            return cast.down(inputs_of(module, children, *args, **kwargs))

    def act(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What linear ``name`` sees of its input ``x``: int8 / FP8 / NVFP4 fake-quantized in jobs
        with activation quantization
        (per token for dynamic activations; static ones need ``quantize`` to have calibrated
        that linear), ``x`` for float linears, weight-only jobs and linears with float inputs
        (w8 fallback, weight-only absorbed linears: ``LinearInfo.float_input``)."""
        act = self.job.act
        fqn = self.fqn(name)
        if act is None or fqn not in self._linears or self._linears[fqn].float_input:
            return x
        if act.dynamic:
            self.job.act_params[fqn] = None
            return fake_quant(x, act, None)
        if fqn not in self.job.act_params:
            raise RuntimeError(f"{fqn}: static activation parameters are calibrated by ctx.quantize; "
                               "this linear was not quantized through it")
        return fake_quant(x, act, self.job.act_params[fqn])

    def hold(self, batches) -> list[torch.Tensor]:
        """A program's list of per-batch tensors: a list, or host-held batches when the job
        offloads its activations (``runtime.offload``, dist_quant/offload.py). ``batches``
        may be a generator: each batch is stored as soon as it is computed."""
        return offload.hold(batches, self.job.offload)

    def streams(self, stage: str, branch_inputs: list[torch.Tensor]) -> bool:
        """Whether ``stage`` (a closing stage whose inputs are computed from ``branch_inputs``)
        streams its inputs: this rank's inputs exceed ``runtime.activation_budget``, they are
        wider than ``branch_inputs`` (otherwise holding those instead saves nothing), and no
        stage hook needs them as a list (W8A8 smoothing / activation calibration). Never when the
        job offloads its activations to host memory (the inputs are then held there instead)."""
        budget = self.cfg.runtime.activation_budget_bytes if self.cfg is not None else None
        lins = self.linears(stage)
        if budget is None or not lins or self.job.hooks or not branch_inputs or self.job.offload is not None:
            return False
        n, width = lins[0].in_features, branch_inputs[0].shape[-1]
        tokens = sum(h.numel() // width for h in branch_inputs)
        need = tokens * n * branch_inputs[0].element_size()
        if n <= width or need <= budget:
            return False
        if self.once(f"stream {stage}"):
            log.info("%s inputs (%.2f GB on this rank) exceed runtime.activation_budget: streamed, each batch "
                     "computed twice", stage, need / 1e9)
        return True

    # -- the collective stage ------------------------------------------------------------------
    def select(self, linears) -> list[LinearInfo]:
        """Quantized linears among ``linears`` (names, LinearInfo, or a stage name), in plan order."""
        if isinstance(linears, str):
            return self.linears(linears)
        out = []
        for item in linears:
            lin = item if isinstance(item, LinearInfo) else self.linear(item)
            if lin is not None and lin.name in self._linears:
                out.append(lin)
        return sorted(out, key=lambda lin: self._order[lin.name])

    def quantize(self, linears, inputs: Inputs, downstream: Callable[[list], list] | None = None,
                 masks: list[torch.Tensor] | None = None, stream: bool = False) -> list[torch.Tensor] | None:
        """Hooks (smoothing, activation quantization) → capture → reduce → solve (owners) →
        broadcast → write (owners), for linears that read the same input. ``inputs``: one
        tensor per batch, or a callable producing them (needed when smoothing refolds the
        norm that makes them). ``downstream(inputs)``: the input of the next stage's linears
        computed from these inputs with the current (float) weights, for smoothing pairs
        whose producer is quantized here (v→o, up→down). Returns the inputs as the
        quantized linears see them. ``stream=True`` (see :meth:`streams`): ``inputs()`` is an
        iterator consumed batch by batch by the capture (its time counts as capture) and
        nothing is returned: the caller computes the inputs again for the forward."""
        make = inputs if callable(inputs) else None
        if stream:
            if make is None or self.job.hooks:
                raise ValueError("quantize(stream=True) takes a callable of the inputs and a job without stage hooks")
            lins = self.select(linears)
            if lins:
                if self.job.check_stop is not None:
                    self.job.check_stop(self.index)
                self._quantize(lins, make(), masks if masks is not None else self.masks)
            return None
        with self.phase("propagate"):
            values = self.hold(make() if make is not None else inputs)
        lins = self.select(linears)
        if not lins:
            return values
        if self.job.check_stop is not None:  # every rank reaches each stage in the same order
            self.job.check_stop(self.index)
        for hook in self.job.hooks:
            values = hook.before_solve(self, lins, values, make, downstream)
        self._quantize(lins, values, masks if masks is not None else self.calib_masks)
        return values

    def _quantize(self, linears: list[LinearInfo], inputs, masks) -> None:
        job, rank = self.job, self.comm.rank
        owners = {r for lin in linears for r in job.owners.solvers(lin)}
        # RTN needs no statistics to solve, but they give its output error for the report.
        stat = self.reduced_stat(linears, inputs, masks, owners)
        # owners: the float32 Hessian and the solver's workspace share the reduced buffer
        tokens = stat.tokens() if rank in owners else 0
        hessian, work = stat.take() if rank in owners else (None, None)
        del stat
        # this rank's row pieces of the stage's linears (a whole linear unless its rows are split)
        mine = [(lin, lo, hi) for lin in linears for r, lo, hi in job.owners.pieces(lin) if r == rank]
        solved: dict = {}
        fused = self._fused_amax(linears) if mine or rank in {job.owners.owner[lin.name] for lin in linears} else None
        if mine:
            with self.phase("solve"):
                solved = self.solve([p[0] for p in mine], hessian, tokens, work=work,
                                    rows=[(lo, hi) for _, lo, hi in mine], solvers=owners,
                                    fused_amax=fused)
        if fused is not None:  # the writer's NVFP4 global scale (the owner may solve no piece)
            job.weight_amax.update({lin.name: fused for lin in linears})
        del hessian, work
        for lin in linears:
            owner = job.owners.owner[lin.name]
            pieces = job.owners.pieces(lin)
            result = solved[lin.name] if len(pieces) == 1 and owner == rank else self._empty_result(lin)
            errors = torch.zeros(len(pieces), 4, dtype=torch.float64, device=self.device)  # num, den, s, fallback
            with self.phase("broadcast"):
                for j, (src, lo, hi) in enumerate(pieces):
                    if len(pieces) > 1 and src == rank:
                        part = solved[lin.name, lo]
                        for dst, t in zip((result.q, result.scale, result.zero), (part.q, part.scale, part.zero)):
                            dst[lo:hi] = t
                        info = self.record.modules.pop(f"{lin.name}[{lo}:{hi}]")
                        errors[j] = torch.tensor([info["err_num"], info["err_den"], info["seconds"],
                                                  float(info["fallback"] is not None)], dtype=torch.float64)
                    for t in (result.q, result.scale, result.zero):
                        self.comm.broadcast(t[lo:hi], src)
                    if len(pieces) > 1:
                        self.comm.broadcast(errors[j], src)
            module = self.module(lin.name)
            for a in range(0, lin.out_features, DEQUANT_ROWS):  # block by block: no full float copy
                rows = slice(a, a + DEQUANT_ROWS)
                block = QuantResult(result.q[rows], result.scale[rows], result.zero[rows])
                module.weight[rows].copy_(block.dequantize(self.args_of(lin)))
            if owner == rank:
                if len(pieces) > 1:  # the writer reports the whole linear
                    num, den = errors[:, :2].sum(dim=0).tolist()
                    fell = [f"{lo}:{hi}" for (_, lo, hi), e in zip(pieces, errors) if e[3] > 0]
                    self.record.modules[lin.name] = {
                        "rank": owner, "rows": [list(p) for p in pieces], "seconds": float(errors[:, 2].max()),
                        "fallback": f"rows {', '.join(fell)} used RTN (see the solving rank's log)" if fell else None,
                        "tokens": tokens, "rel_output_error": error_ratio(num, den)}
                bias = self.tensor(lin.name + ".bias") if lin.has_bias else None
                self.write(lin, result, bias)

    def _fused_amax(self, linears: list[LinearInfo]) -> float | None:
        """FP8 per-tensor weights and NVFP4 global scales: max|w| over the stage's linears (the
        parts a server fuses, q/k/v and gate/up), so that they share one scale: vLLM requantizes
        fused per-tensor FP8 parts to their largest scale (``requantize_with_max_scale``) and takes
        the max of fused NVFP4 global scales (``CompressedTensorsW4A4Fp4``), no-ops when they agree."""
        if not _shares_amax(self.args):
            return None
        return max(float(self.weight(lin.name).abs().amax()) for lin in linears)

    def reduced_stat(self, linears: list[LinearInfo], inputs, masks, owners: set[int]) -> HessianStat:
        """Capture the stage's input statistics on this rank and SUM-reduce them to ``owners``."""
        with self.phase("capture"):
            stat = HessianStat(linears[0].in_features, self.device)
            for x, m in zip(inputs, masks):
                stat.add(x, m)
        with self.phase("reduce"):
            stat.unpack(self.comm.reduce_to(stat.packed(), owners, stat.reduce_op))
        return stat

    def _empty_result(self, lin: LinearInfo) -> QuantResult:
        groups = self.args_of(lin).groups(lin.in_features)
        return QuantResult(
            q=torch.empty(lin.out_features, lin.in_features, dtype=torch.int8, device=self.device),
            scale=torch.empty(lin.out_features, groups, device=self.device),
            zero=torch.empty(lin.out_features, groups, dtype=torch.int8, device=self.device))

    # -- local pieces ----------------------------------------------------------------------------
    def solve(self, linears: list[LinearInfo], hessian: torch.Tensor, tokens: int,
              weights: list[torch.Tensor] | None = None, method: str | None = None,
              work: torch.Tensor | None = None, rows: list[tuple[int, int]] | None = None,
              solvers: set[int] | None = None, fused_amax: float | None = None) -> dict:
        """Solve linears that share the Hessian ``hessian`` on this rank (no collectives).
        GPTQ treats rows independently, so their weights are stacked and solved in one pass
        (one factorization, one column loop), then split back per module. ``weights``
        (float32, already read) and ``method`` override the read and ``quant.method``;
        ``work``: a Hessian-sized float32 buffer the solver may overwrite (stats.HessianStat.take);
        ``rows``: row ranges (pieces of split linears, returned under ``(name, first row)`` and
        recorded under ``name[lo:hi]``); ``solvers``: the ranks solving at the same time (default:
        all); a GPTQ solve gets the cores of the local ranks that wait meanwhile as row workers
        (dist_quant/solver_threads.py). FP8 grid: the scales are fixed from the whole weights first
        (``fused_amax``: the per-tensor max|w| shared by the stage; default: over ``linears``)."""
        t0 = time.perf_counter()
        if weights is None:
            weights = [self.weight(lin.name) for lin in linears]
        scales = self._fp8_scales(linears, weights, fused_amax)
        if rows is not None:
            weights = [w if (lo, hi) == (0, w.shape[0]) else w[lo:hi].clone() for w, (lo, hi) in zip(weights, rows)]
            if scales is not None:
                scales = [s[lo:hi] for s, (lo, hi) in zip(scales, rows)]
        for lin, w in zip(linears, weights):
            check_weight(lin.name, w)
        stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
        hessian = hessian.to(torch.float32).contiguous()
        args = self.args_of(linears[0])  # a stage's linears share their precision (fallback.py)
        method = method or self.cfg.quant.method
        solver = get_solver(method)
        params = self.job.solver_params(method)
        if isinstance(params, GPTQParams) and self.device.type == "cpu":
            info = self.comm.info
            params = replace(params, workers=solve_workers(
                torch.get_num_threads(), info.rank, info.local_world_size,
                range(info.world_size) if solvers is None else solvers))
        clip = self.job.clip(linears, weights, hessian, args) if self.job.clip is not None else None
        with single_threaded(self.device):
            result = solver.solve(stacked, hessian, args, params, work,
                                  scale=torch.cat(scales) if scales is not None else None, clip=clip)
        del stacked
        if result.fallback:
            log.warning("%s: %s", ", ".join(lin.name for lin in linears), result.fallback)
        seconds = time.perf_counter() - t0
        parts = result.split([w.shape[0] for w in weights])
        out = {}
        for k, (lin, w, part) in enumerate(zip(linears, weights, parts)):
            check_result(lin.name, part, args)
            num, den = quantized_output_error(w, part, args, hessian)
            whole = rows is None or rows[k] == (0, lin.out_features)
            key = lin.name if whole else f"{lin.name}[{rows[k][0]}:{rows[k][1]}]"
            self.record.modules[key] = {
                "rank": self.comm.rank, "seconds": seconds / len(linears), "fallback": result.fallback,
                "tokens": tokens, "rel_output_error": error_ratio(num, den)}
            if not whole:  # a piece: its sums travel to the writer (see _quantize)
                self.record.modules[key].update(err_num=num, err_den=den)
            out[lin.name if whole else (lin.name, rows[k][0])] = part
        return out

    def _fp8_scales(self, linears: list[LinearInfo], weights: list[torch.Tensor],
                    fused_amax: float | None) -> list[torch.Tensor] | None:
        """Fixed float-grid scales per weight ([out, groups], floatgrid.grid_scales); None: int grid."""
        if self.args.grid == "int":
            return None
        if _shares_amax(self.args) and fused_amax is None:
            fused_amax = max(float(w.abs().amax()) for w in weights)
            self.job.weight_amax.update({lin.name: fused_amax for lin in linears})
        return [fg.grid_scales(w, self.args.grid, self.args.fp8_strategy, fused_amax) for w in weights]

    def write(self, lin: LinearInfo, result: QuantResult, bias: torch.Tensor | None = None) -> None:
        """Pack a solved linear in the output format and stream it to this rank's part files."""
        with self.phase("write"):
            act = self.job.act_params.get(lin.name) if self.job.act is not None else None
            if self.args.grid == "nvfp4":
                result = replace(result, global_scale=fg.nvfp4_global_scale(torch.tensor(self.job.weight_amax[lin.name])))
            for name, tensor in self.job.fmt.pack_linear(lin.name, result, bias, act).items():
                self.job.writer.add(name, tensor)

    def write_tensors(self) -> None:
        """The layer's other tensors (norms, float linears, biases) owned by this rank."""
        for name in self.job.plan.layer_tensors[self.index]:
            if self.job.owners.owner[name] == self.comm.rank:
                self.job.writer.add(name, self.job.ckpt.for_output(name, self.tensor(name)))
