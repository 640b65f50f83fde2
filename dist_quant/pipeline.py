"""The layer loop. For every decoder layer, stage by stage (q/k/v, o, gate/up, down):
capture statistics of this rank's samples → reduce to the owners → owners solve →
quantized weights broadcast → the stage runs with quantized weights (sequential
quantization, one forward per layer) → owners stream their tensors to their part files.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .algorithms.gptq import GPTQParams, gptq_quantize
from .algorithms.rtn import rtn_quantize
from .calibration import CalibrationSet
from .checkpoint import Checkpoint
from .config import JobConfig
from .formats.registry import OutputFormat, make_format
from .layer_forward import build_skeleton, dense_stage_ops, load_layer, unload_layer
from .memory import trim_heap
from .numerics import check_result, check_weight
from .plan import LinearInfo, ModelPlan, OwnerPlan
from .quant.qparams import QuantArgs, QuantResult
from .runtime import Comm
from .smoothing import W8A8Stages
from .stats import HessianStat, relative_output_error
from .tensorspec import TensorSpec
from .writer import RankWriter

log = logging.getLogger("dist_quant")

PHASES = ("load", "capture", "reduce", "solve", "broadcast", "propagate", "write", "smooth", "act_calib")


def output_specs(plan: ModelPlan, owners: OwnerPlan, ckpt: Checkpoint, args: QuantArgs,
                 fmt: OutputFormat | None = None) -> list[list[TensorSpec]]:
    """Every rank's output tensors, in the order that rank produces them."""
    fmt = fmt or OutputFormat(args)
    per_rank: list[list[TensorSpec]] = [[] for _ in range(owners.world_size)]

    def raw(name: str) -> TensorSpec:
        info = ckpt.tensors[name]
        return TensorSpec(name, info.dtype, info.shape)

    for i in range(plan.num_layers):
        for lin in plan.layer_linears(i):
            bias = raw(lin.name + ".bias") if lin.has_bias else None
            specs = fmt.linear_specs(lin.name, lin.out_features, lin.in_features, bias)
            per_rank[owners.owner[lin.name]].extend(specs)
        for name in plan.layer_tensors[i]:
            per_rank[owners.owner[name]].append(raw(name))
    for name in plan.global_tensors:
        per_rank[owners.owner[name]].append(raw(name))
    return per_rank


@dataclass
class LayerRecord:
    layer: int
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    modules: dict[str, dict] = field(default_factory=dict)  # filled by the owners
    smoothing: dict[str, dict] = field(default_factory=dict)  # per smoothing pair (same on every rank)
    moe: dict = field(default_factory=dict)  # sparse MoE layers: expert coverage and traffic (dist_quant/moe.py)


@contextlib.contextmanager
def _solver_threads(device: torch.device):
    """GPTQ's column loop is a long chain of small ops; on CPU, OpenMP synchronization per
    op costs more than it saves (20x slower with 2 threads on a busy 2-core machine), so
    the solve runs single-threaded and the big GEMMs of the forward keep all threads."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Phase:
    def __init__(self, record: LayerRecord, progress):
        self.record, self.progress = record, progress

    def __call__(self, name: str):
        self._name = name
        if self.progress is not None:
            self.progress.set_postfix_str(f"layer {self.record.layer} {name}", refresh=False)
        return self

    def __enter__(self):
        self._t = time.perf_counter()

    def __exit__(self, *exc):
        self.record.seconds[self._name] += time.perf_counter() - self._t


class LayerwiseQuantizer:
    def __init__(self, cfg: JobConfig, comm: Comm, ckpt: Checkpoint, plan: ModelPlan, owners: OwnerPlan,
                 args: QuantArgs, device: torch.device, writer: RankWriter):
        self.cfg, self.comm, self.ckpt, self.plan, self.owners = cfg, comm, ckpt, plan, owners
        self.args, self.device, self.writer = args, device, writer
        self.dtype = getattr(torch, cfg.model.dtype)
        q = cfg.quant
        self.gptq = GPTQParams(damp=q.damp, block_size=q.block_size, act_order=q.act_order)
        self.fmt = make_format(cfg, args)
        # checkpoint tensors changed by smoothing (this layer's), read before the checkpoint
        self.overrides: dict[str, torch.Tensor] = {}
        self.w8a8 = (W8A8Stages(cfg, comm, plan, ckpt, device, args, self.fmt.act, self.overrides)
                     if self.fmt.act is not None else None)

    def _tensor(self, name: str) -> torch.Tensor:
        t = self.overrides.get(name)
        return t if t is not None else self.ckpt.get(name)

    # -- the loop -------------------------------------------------------------------------
    def run(self, calib: CalibrationSet, progress=None, resume=None) -> list[LayerRecord]:
        """``resume``: a :class:`dist_quant.resume.Progress` (restored state, per-layer checkpoints)."""
        arch = self.plan.arch
        skel = build_skeleton(str(self.ckpt.root), self.dtype, self.device)
        batches = list(calib.batches(self.cfg.calib.batch_size))
        masks = [m.to(self.device) for _, m in batches]
        restored = resume.restored if resume is not None else None
        with torch.no_grad():
            if restored is None:
                embed = self.ckpt.get(arch.embed).to(self.device, self.dtype)
                xs = [F.embedding(ids.to(self.device), embed) for ids, _ in batches]
                del embed
            else:
                xs = [x.to(self.device) for x in restored.xs]
            seq_len = calib.input_ids.shape[1]
            positions = torch.arange(seq_len, device=self.device)[None]
            pos_emb = skel.rotary(xs[0] if xs else torch.zeros(1, seq_len, 1, dtype=self.dtype), positions)
            pos_emb = tuple(t.to(self.dtype) for t in pos_emb)

        records = list(restored.records) if restored is not None else []
        if restored is not None and progress is not None:
            progress.update(restored.layer + 1)
        for i in range(restored.layer + 1 if restored is not None else 0, self.plan.num_layers):
            record = LayerRecord(i)
            phase = _Phase(record, progress)
            with torch.no_grad():
                with phase("load"):
                    layer = load_layer(skel, self.ckpt, arch, i, self.device)
                xs = self._layer(layer, i, xs, masks, pos_emb, record, phase)
                with phase("write"):
                    self._write_layer_tensors(i)
                unload_layer(layer)
                self.overrides.clear()
                self.ckpt.release()  # the layer's checkpoint pages leave the RSS with the handles
            records.append(record)
            if resume is not None:
                resume.layer_done(i, xs, records)
            if progress is not None:
                progress.update(1)
        with torch.no_grad():
            for name in self.plan.global_tensors:
                if self.owners.owner[name] == self.comm.rank:
                    self.writer.add(name, self.ckpt.get(name))
        return records

    def _layer(self, layer, index, xs, masks, pos_emb, record, phase):
        arch = self.plan.arch
        ops = dense_stage_ops(layer, arch, pos_emb)
        linears = self.plan.layer_linears(index)
        prev: list[torch.Tensor | None] = [None] * len(xs)
        sparse = arch.moe is not None and arch.moe.is_sparse(index, self.ckpt.config)
        stages = arch.stages[:2] if sparse else arch.stages  # a sparse MLP is run by moe.py
        for k, (stage, op) in enumerate(zip(stages, ops)):
            with phase("propagate" if stage is not arch.stages[0] else "capture"):
                inputs = [op.make_input(x, p) for x, p in zip(xs, prev)]
            stage_linears = [lin for lin in linears if lin.stage == stage.name]
            if stage_linears and self.w8a8 is not None:  # smoothing + activation quantization
                inputs = self.w8a8.prepare(layer, index, k, ops, xs, prev, inputs, masks, stage_linears,
                                           record, phase)
            # The previous stage's activations are no longer needed once this stage's inputs exist;
            # freeing them (and handing their pages back) keeps about two activation sets alive.
            prev = [None] * len(xs)
            trim_heap()
            if stage_linears:
                self._quantize_stage(layer, stage_linears, inputs, masks, record, phase)
            if op.advance is not None:
                with phase("propagate"):
                    for j, a in enumerate(inputs):  # in place: each old batch is freed as it is replaced
                        xs[j] = op.advance(xs[j], a)
            prev = inputs
        if sparse:  # the MoE block: shared expert, routing, experts on their owners
            from .moe import moe_block

            xs = moe_block(self, layer, index, xs, masks, record, phase)
        return xs

    # -- one stage: capture → reduce → solve → broadcast ----------------------------------------
    def _quantize_stage(self, layer, linears: list[LinearInfo], inputs, masks, record, phase) -> None:
        rank = self.comm.rank
        owners = {self.owners.owner[lin.name] for lin in linears}
        # RTN needs no statistics to solve, but they give its output error for the report.
        with phase("capture"):
            stat = HessianStat(linears[0].in_features, self.device)
            for x, m in zip(inputs, masks):
                stat.add(x, m)
        with phase("reduce"):
            flat = self.comm.reduce_to(stat.packed(), owners, stat.reduce_op)
            stat.unpack(flat)
        hessian = stat.hessian() if rank in owners else None
        tokens = int(stat.count.item()) if rank in owners else 0
        del stat, flat
        mine = [lin for lin in linears if self.owners.owner[lin.name] == rank]
        solved: dict[str, QuantResult] = {}
        if mine:
            with phase("solve"):
                solved = self._solve(mine, hessian, tokens, record)
        for lin in linears:
            owner = self.owners.owner[lin.name]
            module = layer.get_submodule(self.plan.arch.memory_name(lin.name[len(self.plan.arch.layer_prefix(lin.layer)):]))
            if owner == rank:
                result = solved[lin.name]
            else:
                result = QuantResult(
                    q=torch.empty(lin.out_features, lin.in_features, dtype=torch.int8, device=self.device),
                    scale=torch.empty(lin.out_features, self.args.groups(lin.in_features), device=self.device),
                    zero=torch.empty(lin.out_features, self.args.groups(lin.in_features), dtype=torch.int8,
                                     device=self.device))
            with phase("broadcast"):
                for t in (result.q, result.scale, result.zero):
                    self.comm.broadcast(t, owner)
            module.weight.copy_(result.dequantize(self.args).to(module.weight.dtype))
            if owner == rank:
                with phase("write"):
                    bias = self._tensor(lin.name + ".bias") if lin.has_bias else None
                    act = self.w8a8.act_params.get(lin.name) if self.w8a8 is not None else None
                    for name, tensor in self.fmt.pack_linear(lin.name, result, bias, act).items():
                        self.writer.add(name, tensor)

    def _solve(self, linears: list[LinearInfo], hessian: torch.Tensor, tokens: int, record,
               weights: list[torch.Tensor] | None = None, method: str | None = None) -> dict[str, QuantResult]:
        """Solve this rank's linears of one stage. They share the Hessian and GPTQ treats
        rows independently, so their weights are stacked and solved in one pass (one
        factorization, one column loop), then split back per module. ``weights`` (already
        read, float32) and ``method`` override the checkpoint read and ``quant.method``."""
        t0 = time.perf_counter()
        if weights is None:
            weights = [self._tensor(lin.name + ".weight").to(self.device, torch.float32) for lin in linears]
        for lin, w in zip(linears, weights):
            check_weight(lin.name, w)
        stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
        with _solver_threads(self.device):
            if (method or self.cfg.quant.method) == "gptq":
                result = gptq_quantize(stacked, hessian, self.args, self.gptq)
            else:
                result = rtn_quantize(stacked, self.args)
        if result.fallback:
            log.warning("%s: %s", ", ".join(lin.name for lin in linears), result.fallback)
        seconds = time.perf_counter() - t0
        parts = result.split([lin.out_features for lin in linears])
        for lin, w, part in zip(linears, weights, parts):
            check_result(lin.name, part, self.args)
            record.modules[lin.name] = {
                "rank": self.comm.rank, "seconds": seconds / len(linears), "fallback": result.fallback,
                "tokens": tokens,
                "rel_output_error": relative_output_error(w, part.dequantize(self.args), hessian)}
        return {lin.name: part for lin, part in zip(linears, parts)}

    def _write_layer_tensors(self, index: int) -> None:
        for name in self.plan.layer_tensors[index]:
            if self.owners.owner[name] == self.comm.rank:
                self.writer.add(name, self._tensor(name))
