"""The layer loop. For every decoder layer: load it, run its architecture's layer program
(dist_quant/arch/), which quantizes it stage by stage over the stage API
(dist_quant/stage.py: capture → reduce to the owners → owners solve → quantized weights
broadcast → the stage runs with quantized weights, one forward per layer → owners stream
their tensors to their part files), write its other tensors, record progress for resume.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import actdtype, offload
from .algorithms.registry import layer_solver
from .calibration import CalibrationSet
from .checkpoint import Checkpoint
from .config import JobConfig
from .formats.registry import OutputFormat, make_format
from .kvcache import owner as kv_owner
from .layer_forward import build_skeleton, load_layer, unload_layer
from .memory import trim_heap
from .plan import ModelPlan, OwnerPlan
from .quant.qparams import QuantArgs
from .runtime import Comm
from .awq import clip_search
from .smoothing import stage_hooks
from .stage import Job, Lanes, StageContext
from .tensorspec import TensorSpec
from .writer import RankWriter

log = logging.getLogger("dist_quant")

PHASES = ("load", "capture", "reduce", "solve", "broadcast", "propagate", "write", "smooth", "act_calib", "kv_calib")


def output_specs(plan: ModelPlan, owners: OwnerPlan, ckpt: Checkpoint, args: QuantArgs,
                 fmt: OutputFormat | None = None) -> list[list[TensorSpec]]:
    """Every rank's output tensors, in the order that rank produces them."""
    if fmt is None:
        from .fallback import w8_groups

        fmt = OutputFormat(args)
        fmt.linear_args, fmt.groups = w8_groups(plan, args)
    per_rank: list[list[TensorSpec]] = [[] for _ in range(owners.world_size)]

    def raw(name: str) -> TensorSpec:
        info = ckpt.tensors[name]
        return TensorSpec(name, info.out_dtype, info.shape)

    for i in range(plan.num_layers):
        if fmt.kv is not None:  # the KV-cache scales, written right after q/k/v are solved
            attn, layout = plan.arch.layer_prefix(i) + plan.arch.attn, plan.arch.kv_layout.for_format(fmt.name)
            per_rank[kv_owner(owners, attn, layout.owner)].extend(fmt.kv_specs(attn, layout, ckpt.config))
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
    moe: dict = field(default_factory=dict)  # sparse MoE layers: expert coverage and traffic (arch/moe_block.py)


class _Phase:
    """Times one phase of a layer. On an accelerator the device is synchronized at both ends
    (kernels run asynchronously: without it a phase's work would be billed to whichever later
    phase first waits for a result)."""

    def __init__(self, record: LayerRecord, progress, device: torch.device | None = None):
        self.record, self.progress = record, progress
        self.device = device if device is not None and device.type != "cpu" else None

    def __call__(self, name: str):
        self._name = name
        if self.progress is not None:
            self.progress.set_postfix_str(f"layer {self.record.layer} {name}", refresh=False)
        return self

    def __enter__(self):
        if self.device is not None:
            offload.synchronize(self.device)
        self._t = time.perf_counter()

    def __exit__(self, *exc):
        if self.device is not None:
            offload.synchronize(self.device)
        self.record.seconds[self._name] += time.perf_counter() - self._t


class LayerwiseQuantizer:
    """The job's layer loop: for each layer, load → ``arch.program(ctx, xs)`` → write the
    layer's other tensors → resume record. Everything architecture-specific is in the
    program (dist_quant/arch/), everything per stage in the stage API (dist_quant/stage.py)."""

    def __init__(self, cfg: JobConfig, comm: Comm, ckpt: Checkpoint, plan: ModelPlan, owners: OwnerPlan,
                 args: QuantArgs, device: torch.device, writer: RankWriter | None, context=StageContext):
        """``writer`` None and ``context`` a StageContext subclass: a pass that writes nothing
        (the fallback pre-pass, dist_quant/fallback.py)."""
        self.cfg, self.comm, self.ckpt, self.plan, self.owners = cfg, comm, ckpt, plan, owners
        self.args, self.device, self.writer, self.context = args, device, writer, context
        self.dtype = getattr(torch, cfg.model.dtype)
        self.fmt = make_format(cfg, args, plan)
        self.job = Job(cfg, comm, ckpt, plan, owners, args, device, writer, self.fmt, self.dtype,
                       hooks=stage_hooks(cfg, comm, plan, ckpt, device, args, self.fmt.act),
                       clip=clip_search(cfg.quant))
        self.solver = layer_solver(cfg.quant.method)  # the staged program, or a layer solver (AutoRound)
        self.storage = actdtype.storage_dtype(cfg)  # model.activation_dtype (dist_quant/actdtype.py)
        if self.storage != self.dtype:
            self.job.cast = actdtype.StorageCast(self.storage, self.dtype)

    def _prefetch(self, index: int) -> None:
        """Start reading layer ``index``'s tensors that this rank will read (routed experts:
        only its own) in the background (``runtime.prefetch``)."""
        if not self.cfg.runtime.prefetch or index >= self.plan.num_layers:
            return
        prefix, rank = self.plan.arch.layer_prefix(index), self.comm.rank
        self.ckpt.prefetch([n for n in self.ckpt.tensors if n.startswith(prefix) and (
            ".experts." not in n or self.owners.owner.get(n.rsplit(".", 1)[0], rank) == rank)])

    def _offload(self, tokens_x_hidden: int) -> torch.device | None:
        """The device whose activations this job holds in host memory (``runtime.offload``), or None."""
        rt = self.cfg.runtime
        asked, problem = offload.applies(self.cfg, self.plan, self.device, tokens_x_hidden * self.storage.itemsize)
        if not asked:
            return None
        if problem is None:
            log.info("calibration activations held in %s host memory, streamed to %s batch by batch "
                     "(runtime.offload=%s)", "pinned" if self.device.type != "cpu" else "plain", self.device,
                     rt.offload)
            return self.device
        offload.check(self.cfg, self.plan)  # runtime.offload=host: refused (run.py refuses it before any work)
        log.warning("activations exceed runtime.activation_budget but stay on %s: %s", self.device, problem)
        return None

    # -- the loop -------------------------------------------------------------------------
    def run(self, calib: CalibrationSet, progress=None, resume=None,
            smooth: tuple[CalibrationSet, int, int] | None = None) -> list[LayerRecord]:
        """``resume``: a :class:`dist_quant.resume.Progress` (restored state, per-layer checkpoints).
        ``smooth``: (this rank's slice of the smoothing set, its global sample count, this rank's
        first sample) with calib.smooth_path: its batches follow the calibration batches through
        every layer (the smoothing lane, see dist_quant/stage.py)."""
        arch = self.plan.arch
        skel = build_skeleton(str(self.ckpt.root), self.dtype, self.device)
        batches = list(calib.batches(self.cfg.calib.batch_size))
        if smooth is not None:
            self.job.lanes = Lanes(len(batches), smooth[1], smooth[2])
            batches += list(smooth[0].batches(self.cfg.calib.batch_size))
        masks = [m.to(self.device) for _, m in batches]
        restored = resume.restored if resume is not None else None
        with torch.no_grad():
            hidden = self.ckpt.tensors[arch.embed].shape[-1]
            self.job.offload = self._offload(sum(int(ids.numel()) for ids, _ in batches) * hidden)
            if restored is None:
                embed = self.ckpt.get(arch.embed).to(self.device, self.dtype)
                xs = offload.hold((F.embedding(ids.to(self.device), embed).to(self.storage) for ids, _ in batches),
                                  self.job.offload)
                del embed
            else:
                xs = offload.hold((x.to(self.device, self.storage) for x in restored.xs), self.job.offload)
            seq_len = calib.input_ids.shape[1]
            positions = torch.arange(seq_len, device=self.device)[None]
            # the rotary tables in the compute dtype (rotary returns them in its input's dtype)
            probe = xs[0].to(self.dtype) if xs else torch.zeros(1, seq_len, 1, dtype=self.dtype)
            pos_emb = skel.rotary(probe, positions)
            pos_emb = tuple(t.to(self.dtype) for t in pos_emb)
        self.job.pos_emb = pos_emb
        carry = self.solver.start(xs)  # what the layer solver carries along (AutoRound: the float chain)

        records = list(restored.records) if restored is not None else []
        if restored is not None and progress is not None:
            progress.update(restored.layer + 1)
        self.job.check_stop = resume.check_stop if resume is not None else None
        for i in range(restored.layer + 1 if restored is not None else 0, self.plan.num_layers):
            if self.job.check_stop is not None:
                self.job.check_stop(i)
            record = LayerRecord(i)
            phase = _Phase(record, progress, self.device)
            with torch.no_grad():
                with phase("load"):
                    layer = load_layer(skel, self.ckpt, arch, i, self.device)
                    if self.job.cast is not None:
                        self.job.cast.attach(layer)
                self._prefetch(i + 1)  # read while this layer computes
                ctx = self.context(self.job, layer, i, masks, record, phase)
                xs, carry = self._layer(layer, i, xs, masks, pos_emb, record, phase, ctx=ctx, carry=carry)
                with phase("write"):
                    ctx.write_tensors()
                if self.job.cast is not None:
                    self.job.cast.detach()
                unload_layer(layer)
                del ctx
                self.ckpt.release()  # the layer's checkpoint pages leave the RSS with the handles
            if self.cfg.runtime.heap == "trim":
                trim_heap()  # runtime.heap=trim: once per layer (dist_quant/memory.py)
            records.append(record)
            if resume is not None:
                resume.layer_done(i, offload.host_tensors(xs), records)
            if progress is not None:
                progress.update(1)
        if resume is not None:
            resume.flush()  # the last layer's state, complete before the output is finished
        with torch.no_grad():
            for name in self.plan.global_tensors if self.writer is not None else ():
                if self.owners.owner[name] == self.comm.rank:
                    self.writer.add(name, self.ckpt.for_output(name, self.ckpt.get(name)))
        return records

    def _layer(self, layer, index, xs, masks, pos_emb, record, phase, ctx: StageContext | None = None,
               carry=None):
        """Decoder layer ``index`` through its architecture's program (or the job's layer
        solver); returns its outputs and what the solver carries to the next layer."""
        if ctx is None:
            ctx = StageContext(self.job, layer, index, masks, record, phase)
        return self.solver.program(ctx, xs, carry)
