"""Fallback of sensitive linears (docs/fallback.md): which linears stay in higher precision
(``quant.fallback.to``: ``float`` = left unquantized, ``w8`` = int8 per-channel weights with the
job's solver), and how the output declares them.

* ``quant.disable_names``: by name (full name, suffix or fnmatch pattern, matched like
  ``quant.disable_anti_names``: :func:`dist_quant.smoothing.pattern_matches`).
* ``quant.fallback.max_linears`` / ``quant.fallback.threshold``: by a **sensitivity pre-pass**
  before the quantization run. The pre-pass runs the layer programs over the float model
  (no solve is applied, nothing is written): each stage's Hessian is SUM-reduced to the
  linears' owners as in the run, and the owner measures the relative output error of
  round-to-nearest weights (the job's bits / group / observer) with the same measure the
  report uses (:func:`dist_quant.stats.quantized_output_error`). The per-linear errors are
  SUM all-reduced into one vector (each entry has one nonzero contribution, so every rank
  holds the same numbers) and rank 0 decides (:meth:`Comm.decide`): the N largest (ties by
  name), plus every one above τ.
* Routed MoE experts are never candidates: vLLM builds one ``FusedMoE`` layer from all the
  experts of a layer and ``CompressedTensorsMoEMethod.get_moe_method``
  (vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe.py) takes
  one scheme for it, looked up from expert 0's names (``<experts>.0.gate_proj`` …) and required
  equal for gate/up/down; SGLang's copy does the same. One expert kept in higher precision
  could not be served. The pre-pass still runs the MoE blocks (router, dispatch, the float
  experts, combine: :class:`ProbeContext`) so that the attention, shared-expert and dense-MLP
  linears of later layers are measured on the float model's inputs.
* Fused partners: vLLM and SGLang fuse q/k/v (``qkv_proj``), gate/up (``gate_up_proj``) and
  MLA's q_a/kv_a (``fused_qkv_a_proj``) into one layer with one scheme (a mixed one is refused,
  ``should_ignore_layer``), so a chosen linear brings every linear of its stage (those that share
  its input) along.
"""
from __future__ import annotations

import logging
import re
import torch

from .algorithms.registry import get_solver
from .config import ConfigError
from .plan import Fallback, LinearInfo, ModelPlan, inspect_model
from .quant.qparams import QuantArgs
from .smoothing import pattern_matches
from .stage import StageContext
from .stats import error_ratio, quantized_output_error

log = logging.getLogger("dist_quant")

W8_KINDS = ("w8", "w8a8")  # fallbacks with int8 per-channel weights; "w8" keeps float inputs (W8A16)
# shard leaf names → the fused layer vLLM / SGLang build from them (packed_modules_mapping)
FUSED_NAMES = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj",
               ("q_a_proj", "kv_a_proj_with_mqa"): "fused_qkv_a_proj"}
PROBE_SOLVER = "rtn"


def stage_groups(plan: ModelPlan) -> dict[str, tuple[str, ...]]:
    """Every non-expert linear → the linears of its layer and stage (they share an input, and
    the servers fuse them), in plan order."""
    groups: dict[tuple[int, str], list[str]] = {}
    for lin in plan.linears:
        if lin.expert is None:
            groups.setdefault((lin.layer, lin.stage), []).append(lin.name)
    return {name: tuple(members) for members in groups.values() for name in members}


def with_partners(chosen: dict[str, Fallback], plan: ModelPlan, to: str) -> dict[str, Fallback]:
    """``chosen`` plus the stage partners of each (reason ``fused with <name>``)."""
    groups = stage_groups(plan)
    out = dict(chosen)
    for name in list(chosen):
        for other in groups.get(name, ()):
            if other not in out:
                out[other] = Fallback(other, to, f"fused with {name}")
    return out


def manual(plan: ModelPlan, quant) -> dict[str, Fallback]:
    """``quant.disable_names`` matched against the plan's linears (with their partners)."""
    chosen: dict[str, Fallback] = {}
    for pattern in quant.disable_names:
        hits = [lin for lin in plan.linears if pattern_matches(pattern, lin.name)]
        if not hits:
            raise ConfigError(f"quant.disable_names={list(quant.disable_names)!r}: {pattern!r} matches no "
                              "quantized linear")
        expert = next((lin for lin in hits if lin.expert is not None), None)
        if expert is not None:
            raise ConfigError(f"quant.disable_names={list(quant.disable_names)!r}: {pattern!r} matches the routed "
                              f"expert linear {expert.name!r}; routed experts share one fused-MoE scheme per layer")
        for lin in hits:
            chosen.setdefault(lin.name, Fallback(lin.name, quant.fallback.to, "disable_names"))
    return with_partners(chosen, plan, quant.fallback.to)


def choose(errors: dict[str, float], max_linears: int, threshold: float | None) -> dict[str, str]:
    """Pure: the ``max_linears`` names of largest error (ties by name) → ``top-N``, and every
    name above ``threshold`` → ``threshold``."""
    ranked = sorted(errors, key=lambda n: (-errors[n], n))
    out = {name: "top-N" for name in ranked[:max_linears]}
    if threshold is not None:
        for name in ranked:
            if errors[name] > threshold:
                out.setdefault(name, "threshold")
    return out


def automatic(plan: ModelPlan, quant, errors: dict[str, float], already: dict[str, Fallback]) -> dict[str, Fallback]:
    """The pre-pass decision over the linears not already kept by name."""
    fb = quant.fallback
    candidates = {n: e for n, e in errors.items() if n not in already}
    picked = choose(candidates, fb.max_linears, fb.threshold)
    chosen = {**already, **{n: Fallback(n, fb.to, why, errors[n]) for n, why in picked.items()}}
    out = with_partners(chosen, plan, fb.to)
    return {n: (f if f.probe_error is not None or n not in errors else
                Fallback(f.name, f.to, f.reason, errors[n])) for n, f in out.items()}


def manual_plan(ckpt, quant) -> ModelPlan:
    """The model plan with ``quant.disable_names`` applied."""
    plan = inspect_model(ckpt, quant)
    kept = manual(plan, quant)
    return inspect_model(ckpt, quant, kept) if kept else plan


def w8_args(args: QuantArgs) -> QuantArgs:
    """int8 per-channel weights, otherwise as the job (symmetry, observer, scale dtype)."""
    return QuantArgs(8, -1, args.symmetric, args.scale_dtype, mse=args.mse, mse_norm=args.mse_norm)


def server_targets(names: list[str]) -> list[str]:
    """compressed-tensors targets for ``names``: one anchored regex per stage group, matching the
    checkpoint names (transformers, compressed-tensors) and the fused layer name vLLM and SGLang
    look up (``model.layers.0.self_attn.qkv_proj``). A plain name would not do: their
    ``find_matched_target`` tries name targets, then the class name (``"Linear"`` is contained in
    ``QKVParallelLinear``, so group_0 would win), and only then the fused shards."""
    by_parent: dict[str, list[str]] = {}
    for name in names:
        parent, leaf = name.rsplit(".", 1)
        by_parent.setdefault(parent, []).append(leaf)
    targets = []
    for parent, leaves in sorted(by_parent.items()):
        alts = set(leaves)
        for shards, fused in FUSED_NAMES.items():
            if set(shards) <= alts:
                alts.add(fused)
        targets.append("re:^" + re.escape(parent) + r"\.(" + "|".join(sorted(alts)) + ")$")
    return targets


def w8_groups(plan: ModelPlan, args: QuantArgs) -> tuple[dict[str, QuantArgs], tuple]:
    """Per-linear args and the extra config group of the plan's int8 (``w8`` / ``w8a8``) linears."""
    names = [lin.name for lin in plan.linears if lin.fallback in W8_KINDS]
    if not names:
        return {}, ()
    a8 = w8_args(args)
    return {n: a8 for n in names}, ((server_targets(names), a8),)


def linear_args(job_args: QuantArgs, lin: LinearInfo) -> QuantArgs:
    return w8_args(job_args) if lin.fallback in W8_KINDS else job_args


# -- the sensitivity pre-pass ----------------------------------------------------------------------

class FloatWeights:
    """What :meth:`ProbeContext.solve` returns for a routed expert: its float weight, which
    ``dequantize`` gives back unchanged (so the MoE block propagates the float expert)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def dequantize(self, args=None) -> torch.Tensor:
        return self.weight


class ProbeContext(StageContext):
    """The stage API without solving or writing: each stage's owners measure the RTN error of
    their linears on the float model's inputs; the module weights stay float.

    MoE layers (dist_quant/arch/moe_block.py): the router, the shared experts and the dense
    stages go through ``quantize`` like any stage (measured); the routed experts are solved by
    the block itself through ``ctx.solve``, which here solves nothing and hands back the float
    weights, and their statistics are not captured (``expert_statistics``): dispatch, the
    experts' float outputs and combine still run, so later layers see the float model's inputs.
    """

    expert_statistics = False

    def _quantize(self, linears, inputs, masks) -> None:
        job, rank = self.job, self.comm.rank
        owners = {job.owners.owner[lin.name] for lin in linears}
        stat = self.reduced_stat(linears, inputs, masks, owners)
        if rank not in owners:
            return
        hessian = stat.hessian()
        solver, params = get_solver(PROBE_SOLVER), job.solver_params(PROBE_SOLVER)
        with self.phase("solve"):
            for lin in linears:
                if job.owners.owner[lin.name] != rank:
                    continue
                w = self.weight(lin.name)
                result = solver.solve(w, hessian, self.args, params, None)
                num, den = quantized_output_error(w, result, self.args, hessian)
                self.record.modules[lin.name] = {"rel_output_error": error_ratio(num, den)}

    def solve(self, linears, hessian, tokens, weights=None, method=None, **_) -> dict:
        """Routed experts: not candidates (one fused-MoE scheme per layer), nothing solved."""
        if weights is None:
            weights = [self.weight(lin.name) for lin in linears]
        out = {}
        for lin, w in zip(linears, weights):
            self.record.modules[lin.name] = {}  # the block adds its per-expert fields
            out[lin.name] = FloatWeights(w)
        return out

    def write(self, lin, result, bias=None) -> None:
        pass

    def write_tensors(self) -> None:
        pass


def candidates(plan: ModelPlan) -> list[str]:
    """The linears the pre-pass ranks, in plan order: every quantized linear except the routed
    experts (see the module docstring)."""
    return [lin.name for lin in plan.linears if lin.expert is None]


def probe_errors(cfg, comm, ckpt, plan, owners, args, device, calib) -> dict[str, float]:
    """Pre-pass relative output errors of the plan's non-expert linears (the same on every rank)."""
    from .pipeline import LayerwiseQuantizer

    records = LayerwiseQuantizer(cfg, comm, ckpt, plan, owners, args, device, None,
                                 context=ProbeContext).run(calib)
    names = candidates(plan)
    mine = {name: m["rel_output_error"] for r in records for name, m in r.modules.items() if "rel_output_error" in m}
    vec = torch.tensor([mine.get(n, 0.0) for n in names], dtype=torch.float64)
    comm.all_reduce(vec)
    return dict(zip(names, vec.tolist()))


def decide(cfg, comm, ckpt, plan, owners, args, device, calib,
           already: dict[str, Fallback]) -> tuple[dict[str, Fallback], dict[str, float]]:
    """Run the pre-pass and choose (rank 0 decides on the reduced errors; every rank gets it).
    Returns the decision and the pre-pass error of every linear."""
    errors = probe_errors(cfg, comm, ckpt, plan, owners, args, device, calib)
    chosen = comm.decide(lambda: automatic(plan, cfg.quant, errors, already))
    comm.rank0(log_decision, chosen, errors)
    return chosen, errors


def log_decision(chosen: dict[str, Fallback], errors: dict[str, float]) -> None:
    for f in sorted(chosen.values(), key=lambda f: f.name):
        err = f" (pre-pass error {f.probe_error:.4g})" if f.probe_error is not None else ""
        log.info("fallback: %s kept at %s: %s%s", f.name, f.to, f.reason, err)


def report_section(cfg, fallbacks: tuple[Fallback, ...], errors: dict[str, float] | None,
                   module_errors: dict[str, float]) -> dict:
    """``quant_report.json``'s ``fallback`` entry: the rule, every fallback with its pre-pass
    error and its error as written (w8: the run's relative output error; float: 0)."""
    fb = cfg.quant.fallback
    rows = [{"name": f.name, "to": f.to, "reason": f.reason, "probe_error": f.probe_error,
             "rel_output_error": 0.0 if f.to == "float" else module_errors.get(f.name)}
            for f in sorted(fallbacks, key=lambda f: f.name)]
    return {"max_linears": fb.max_linears, "threshold": fb.threshold, "to": fb.to,
            "disable_names": list(cfg.quant.disable_names),
            "pre_pass": f"{PROBE_SOLVER} on the float model's inputs" if errors is not None else None,
            "linears": rows, "probe_errors": errors}
