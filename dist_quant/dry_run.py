"""``dry_run=true``: the plan from config.json and safetensors headers only, for any world size.

No tensor data is read and no process group is started, so ``runtime.world_size=N``
plans an N-rank job from one process: layers and their quantized modules with the owner
of each, the bytes each rank reads and writes, its estimated peak memory, and the output
part files. Settings that cannot work (an unsupported architecture, a group size that
does not divide a linear's input features, missing tensors, ...) fail here, exit 2.

Peak memory per rank (on its compute device) is estimated stage by stage by
:mod:`dist_quant.estimate` (see there for what is counted), plus the process's fixed
overhead. Linears whose rows are split over several owners (``OwnerPlan.rows``) are shown
as ``down_proj->0,1,2,3`` in the plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import estimate as mem
from .checkpoint import DTYPE_BYTES
from .calibration import rank_rows
from .config import JobConfig
from .algorithms.registry import layer_solver
from .estimate import DTYPE_SIZE, PROCESS_OVERHEAD

@dataclass
class RankEstimate:
    rank: int
    samples: int
    linears: int
    solve_cost: float
    read_bytes: int
    write_bytes: int
    part_files: list[str] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)  # component → bytes

    worst_stage: str = ""

    @property
    def peak_bytes(self) -> int:
        m = self.memory
        layer = m["layer_weights"] + m["activations"] + m["hessians"] + m["solve_weight"]
        return max(layer, m["embedding_phase"]) + m["process"]


def _gb(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB"


def estimate(cfg: JobConfig, ckpt, plan, owners, parts, world_size: int) -> list[RankEstimate]:
    """Per-rank reads, writes and peak memory, from headers and the plan only."""
    c = DTYPE_SIZE[cfg.model.dtype]
    conf = ckpt.config
    hidden = int(conf.get("hidden_size") or ckpt.tensors[plan.arch.embed].shape[-1])
    inter = max([lin.in_features for lin in plan.linears if lin.stage == "mlp_out"] +
                [int(conf.get("intermediate_size") or hidden)])
    heads = int(conf.get("num_attention_heads") or 1)
    vocab = ckpt.tensors[plan.arch.embed].shape[0]
    n, seq, batch = cfg.calib.num_samples, cfg.calib.seq_len, cfg.calib.batch_size
    # calib.smooth_path: the smoothing set's samples are carried through every layer beside them
    n_smooth = (cfg.calib.smooth_num_samples or n) if cfg.calib.smooth_path else 0

    layer_bytes = []  # per layer: bytes on disk of all its tensors, and elements
    layer_numel = []
    # MoE: routed experts are read by their owners only, one expert at a time (arch/moe_block.py)
    experts: dict[tuple[int, int], int] = {}
    for lin in plan.linears:
        if lin.expert is not None:
            experts[(lin.layer, lin.expert)] = experts.get((lin.layer, lin.expert), 0) + \
                lin.in_features * lin.out_features
    expert_weights = {lin.name + ".weight" for lin in plan.linears if lin.expert is not None}
    for i in range(plan.num_layers):
        prefix = plan.arch.layer_prefix(i)
        infos = [t for name, t in ckpt.tensors.items() if name.startswith(prefix) and name not in expert_weights]
        layer_bytes.append(sum(t.read_bytes for t in infos))  # on disk (FP8 releases: float8 + scales)
        layer_numel.append(sum(math.prod(t.shape) for t in infos))
    every_rank_reads = sum(layer_bytes) + ckpt.tensors[plan.arch.embed].read_bytes
    # the stages whose memory is estimated: dense stages by (layer, stage), a sparse MoE MLP as one
    stage_groups: dict[tuple[int, str], list] = {}
    for lin in plan.linears:
        key = (lin.layer, "moe_mlp" if lin.expert is not None else lin.stage)
        stage_groups.setdefault(key, []).append(lin)

    out = []
    for r in range(world_size):
        lo, hi = rank_rows(n, r, world_size, batch)
        samples = hi - lo
        s_lo, s_hi = rank_rows(n_smooth, r, world_size, batch) if n_smooth else (0, 0)
        tokens = (samples + s_hi - s_lo) * seq  # activations held: both lanes
        b = min(batch, samples)
        mine = [lin for lin in plan.linears if owners.owner[lin.name] == r]
        # reads: every layer's weights (all ranks run every layer) and the embedding; owners
        # read their linears again to solve, and re-read the other tensors they write
        reads = every_rank_reads
        reads += sum(ckpt.tensors[lin.name + ".weight"].read_bytes for lin in mine)
        reads += sum(ckpt.tensors[lin.name + ".bias"].read_bytes for lin in mine if lin.has_bias)
        rest = [t for grp in plan.layer_tensors for t in grp] + list(plan.global_tensors)
        reads += sum(ckpt.tensors[t].read_bytes for t in rest if owners.owner.get(t) == r)
        my_parts = [p for p in parts if p.rank == r]
        held = DTYPE_SIZE[cfg.model.activation_dtype or cfg.model.dtype]  # activations as held (model.activation_dtype)
        shape = mem.Shape(tokens, b * seq, seq, hidden, heads, c, held)
        host = None  # runtime.offload: the activations as held in host memory; the device has two batches
        if _offloads(cfg, plan, tokens * hidden * held):
            host = max(_stage_memory(cfg, ckpt, plan, owners, shape, r, key, lins, world_size,
                                     stream=False)[1]["activations"] for key, lins in stage_groups.items())
            shape = mem.Shape(min(tokens, 2 * b * seq), b * seq, seq, hidden, heads, c, held)
        stage_peak, stage_parts, worst = 0, {"activations": 0, "hessians": 0, "solve_weight": 0}, ""
        for key, lins in stage_groups.items():
            total, parts_ = _stage_memory(cfg, ckpt, plan, owners, shape, r, key, lins, world_size,
                                          stream=host is None)  # offloading never streams (stage.streams)
            if total > stage_peak:
                stage_peak, stage_parts, worst = total, parts_, f"layer {key[0]} {key[1]}"
        tune = layer_solver(cfg.quant.method).memory  # a layer solver's own peak (AutoRound's tuning)
        for i in range(plan.num_layers if tune is not None else 0):
            total, parts_ = tune(shape, mem.tuned_weights(plan.layer_linears(i)), inter)
            if total > stage_peak:
                stage_peak, stage_parts, worst = total, parts_, f"layer {i} {cfg.quant.method} tuning"
        memory = {
            "layer_weights": max(layer_numel, default=0) * c + 4 * max(experts.values(), default=0),
            **stage_parts,
            "embedding_phase": (vocab * hidden + tokens * hidden) * c,
            # device=auto: the overhead of an accelerator process (the larger one)
            "process": PROCESS_OVERHEAD.get(cfg.runtime.device, PROCESS_OVERHEAD["cuda"]),
        }
        if host is not None:  # not part of the (device) peak
            memory["host_activations"] = host
        out.append(RankEstimate(r, samples, len(mine), owners.solve_cost[r] if owners.solve_cost else 0.0,
                                reads, sum(p.nbytes for p in my_parts), [p.file for p in my_parts], memory,
                                worst))
    return out


def _stage_memory(cfg, ckpt, plan, owners, shape, rank, key, lins, world_size, stream: bool = True
                  ) -> tuple[int, dict]:
    """Peak of one stage (``key`` = (layer, stage)) on ``rank``; see dist_quant/estimate.py."""
    layer, stage = key
    if stage == "moe_mlp":
        conf = ckpt.config
        experts = max(lin.expert for lin in lins) + 1
        top_k = int(conf.get("num_experts_per_tok") or conf.get("top_k") or 1)
        inter = max(lin.in_features for lin in lins if lin.stage == "expert_out")
        acc = 8 if cfg.model.dtype == "float32" else 4
        return mem.moe_mlp_bytes(shape, experts, top_k, world_size, (inter, shape.hidden), acc)
    n = lins[0].in_features
    mine = [(lin, lo, hi) for lin in lins for rr, lo, hi in owners.pieces(lin) if rr == rank]
    read = [(lin.out_features, lin.in_features, DTYPE_BYTES.get(ckpt.tensors[lin.name + ".weight"].dtype, 2))
            for lin in {m[0].name: m[0] for m in mine}.values()]
    solve = mem.solve_weight_bytes(read, [(hi - lo, lin.in_features) for lin, lo, hi in mine])
    group = cfg.quant.group_size if cfg.quant.group_size > 0 else lins[0].in_features
    received = mem.received_bytes([(lin.out_features, lin.in_features) for lin in lins], group)
    c, b = shape.compute_bytes, shape.batch_tokens
    extra = 0
    if stage == "mlp_out":  # one batch's gate, up and act(gate)·up
        extra = 3 * b * n * c
    elif stage == "attn_out":  # one batch's attention scores (an upper bound for SDPA)
        extra = (b // shape.seq_len) * shape.heads * shape.seq_len ** 2 * c
    return mem.stage_total(shape, n, extra, solve, received, streamed=stream and _streamed(cfg, stage, n, shape))


def _offloads(cfg, plan, residual_bytes: int) -> bool:
    """The rule of ``LayerwiseQuantizer._offload`` (runtime.offload; device auto: an accelerator)."""
    from types import SimpleNamespace

    from . import offload

    device = SimpleNamespace(type="cuda" if cfg.runtime.device == "auto" else cfg.runtime.device)
    asked, problem = offload.applies(cfg, plan, device, residual_bytes)
    return asked and problem is None


def _streamed(cfg, stage: str, n: int, shape) -> bool:
    """The rule of ``StageContext.streams`` for a closing stage of a dense residual branch."""
    budget = cfg.runtime.activation_budget_bytes
    hooks = cfg.quant.act_bits is not None or cfg.quant.smooth != "none"  # smoothing.stage_hooks
    return (stage in ("attn_out", "mlp_out") and budget is not None and not hooks and n > shape.hidden
            and shape.tokens * n * shape.held_bytes > budget)


def plan_report(cfg: JobConfig, model_path: str, world_size: int) -> tuple[list[str], list[str]]:
    """(lines to print, warnings) for a dry run; raises the user errors a real run would."""
    from .pipeline import output_specs
    from .run import output_dir, prepare
    from .writer import plan_parts

    ckpt, plan, owners, args = prepare(cfg, model_path, world_size)
    from .formats.registry import make_format

    fmt = make_format(cfg, args, plan)  # the plan's w8 / weight-only linears
    parts = plan_parts(output_specs(plan, owners, ckpt, args, fmt), cfg.output.part_file_bytes,
                       prefix=fmt.part_prefix)
    ranks = estimate(cfg, ckpt, plan, owners, parts, world_size)
    q, cal = cfg.quant, cfg.calib
    warnings = []
    batches = -(-cal.num_samples // cal.batch_size)  # a rank calibrates on whole global batches
    if batches < world_size:
        warnings.append(f"calib.num_samples={cal.num_samples} in batches of calib.batch_size={cal.batch_size} "
                        f"is {batches} batches < world size {world_size}: {world_size - batches} rank(s) get "
                        f"no calibration samples")
    max_pos = ckpt.config.get("max_position_embeddings")
    if isinstance(max_pos, int) and cal.seq_len > max_pos:
        warnings.append(f"calib.seq_len={cal.seq_len} exceeds the model's max_position_embeddings={max_pos}")
    from .servability import plan_warnings

    warnings += plan_warnings(cfg, plan, args.scale_dtype)  # which servers' kernels can serve the output

    input_bytes = sum(t.read_bytes for t in ckpt.tensors.values())
    output_bytes = sum(p.nbytes for p in parts)
    lines = [
        "dry run: nothing is read but config.json and safetensors headers; no process is started",
        f"model   {model_path}",
        f"        {plan.arch.name}, {plan.num_layers} layers, {len(plan.linears)} quantized linears"
        f"{', ' + str(len(plan.ignored)) + ' left in float (quant.ignore)' if plan.ignored else ''}, "
        f"{_gb(input_bytes)} of weights, tied embeddings: {'yes' if plan.tied_embeddings else 'no'}",
        f"quant   {q.name}: {q.method} {q.bits}-bit, group size {q.group_size}, "
        f"{'symmetric' if q.symmetric else 'asymmetric'}, observer {q.observer}",
        f"calib   {cal.num_samples} samples x {cal.seq_len} tokens, batch {cal.batch_size} per rank, "
        f"compute dtype {cfg.model.dtype}"
        + (f", activations held in {cfg.model.activation_dtype}" if cfg.model.activation_dtype not in
           (None, cfg.model.dtype) else "")
        + (f"; smoothing set {cal.smooth_num_samples or cal.num_samples} samples carried beside them "
           f"(calib.smooth_path, in the activations)" if cal.smooth_path else ""),
        f"output  {output_dir(cfg, model_path)}: {_gb(output_bytes)} in {len(parts)} part file(s) "
        f"(output.part_file_size={cfg.output.part_file_size})",
        f"world size {world_size}",
        "",
        "rank  samples  linears  solve cost  read        write       part files  est. peak memory",
    ]
    for e in ranks:
        lines.append(f"{e.rank:>4}  {e.samples:>7}  {e.linears:>7}  {e.solve_cost:>10.3g}  {_gb(e.read_bytes):<10}  "
                     f"{_gb(e.write_bytes):<10}  {len(e.part_files):>10}  {_gb(e.peak_bytes)}")
    worst = max(ranks, key=lambda e: e.peak_bytes)
    m = worst.memory
    lines += ["", f"peak memory of rank {worst.rank} ({_gb(worst.peak_bytes)}, at {worst.worst_stage}): "
              + ", ".join(f"{k.replace('_', ' ')} {_gb(v)}" for k, v in m.items() if k != "host_activations")]
    if "host_activations" in m:
        lines.append(f"activations held in pinned host memory (runtime.offload={cfg.runtime.offload}), "
                     f"not in the device peak: {_gb(m['host_activations'])} on rank {worst.rank}; the device "
                     f"holds two batches")
    lines += ["", "part files:"]
    for p in parts:
        lines.append(f"  {p.file}  rank {p.rank}  {_gb(p.nbytes)}  {len(p.tensors)} tensors")
    split = [lin for lin in plan.linears if lin.name in owners.rows]
    if split:
        lin = split[0]
        lines += ["", f"row split: {len(split)} linear(s) solved by several ranks that share the Hessian, e.g. "
                  f"{lin.name}: " + ", ".join(f"rows {lo}-{hi} on rank {r}" for r, lo, hi in owners.pieces(lin))]
    lines += ["", "plan (module -> owner rank):" + (" (a list: its rows are split over those ranks; the first "
                                                    "writes it)" if split else "")]
    for i in range(plan.num_layers):
        prefix = plan.arch.layer_prefix(i)
        mods = "  ".join(f"{lin.name[len(prefix):]}->{','.join(map(str, owners.solvers(lin)))}"
                         for lin in plan.layer_linears(i))
        lines.append(f"  layer {i}: {mods}")
    return lines, warnings


def dry_run(cfg: JobConfig, world_size: int) -> int:
    model_path = cfg.model.path
    if not model_path:
        from .config import ConfigError
        from .demo import demo_checkpoint_or_error

        model_path, error = demo_checkpoint_or_error()
        if error:
            raise ConfigError(error)
    lines, warnings = plan_report(cfg, model_path, world_size)
    for line in lines:
        print(line)
    for w in warnings:
        print(f"warning: {w}")
    return 0
