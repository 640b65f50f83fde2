"""Registries of the algorithms a job can name: weight solvers (``quant.method`` /
``quant.weight_solver``) and activation smoothers (``quant.smooth``). Config validation
reads their keys; the stage API (dist_quant/stage.py) looks the chosen one up. Adding a
solver is one entry here plus its pure function in its own file.

A solver is ``solve(W, H, args, params, work, scale, clip) -> QuantResult`` (``W`` float32 [out, in], ``H`` the
normalized Hessian of the inputs, float32, used as scratch and restored; ``work`` a buffer of
its shape the solver may overwrite, or None; ``scale``: the fixed FP8-grid scales, or None; ``clip`` None or per-(row, group)
clipping ratios chosen beforehand, AWQ's clipping search), ``params(quant_config)`` builds its frozen
parameters once per job, and ``cost(out, in)`` is the relative solve cost the owner plan
balances.

A layer solver (``LAYER_SOLVERS``: AutoRound) tunes a whole decoder layer at once instead of
one stage's linears: ``program(ctx, xs, carry) -> (xs, carry)`` replaces the architecture's
staged program for the layer, ``start(xs)`` makes what it carries from layer to layer (the
float chain's activations), ``check(arch)`` refuses architectures it does not cover before
any work, ``params`` and ``cost`` as for a solver. Per-linear solvers run through
:data:`STAGED`, the architecture's own program. ``quant.method`` names either kind.

A smoother (:class:`Smoother`) chooses per-channel scales ``s`` for one smoothing pair:
``smoother.choose(q, a, w, search) -> (s, alpha, beta, searched, rel_error)``, where ``q`` is
the QuantConfig, ``a`` / ``w`` the activation / weight statistics per input channel that the
smoother's ``statistic`` names, and ``search(alpha)`` runs the smoother's search when it asks
for one. ``statistic`` says what the smoothing hook measures and how it scores candidates:

* ``"absmax"`` (W8A8 smoothers: SmoothQuant, Flex smooth): max |x| (MAX-reduced) and the
  weight column max; the search scores int8 products (dist_quant/smoothing.py);
* ``"absmean"`` (AWQ, weight-only): mean |x| (SUM-reduced sums and counts) and AutoAWQ's
  group-normalized mean |w|; the search scores the output error of the quantized weights
  (dist_quant/awq.py, algorithms/awq.py). ``weight_only``: needs no activation quantization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .awq import awq_scales
from .flex_smooth import flex_scales
from .gptq import GPTQParams, gptq_quantize_
from .rtn import rtn_quantize
from .smoothquant import smoothquant_scales


@dataclass(frozen=True)
class Solver:
    name: str
    solve: Callable[..., Any]  # (W, H, args, params, work) -> QuantResult
    params: Callable[[Any], Any]  # QuantConfig -> frozen params
    cost: Callable[[int, int], float]  # (out_features, in_features) -> relative cost


def _gptq_params(q) -> GPTQParams:
    return GPTQParams(damp=q.damp, block_size=q.block_size, act_order=q.act_order, kernel=q.kernel)


SOLVERS: dict[str, Solver] = {
    "gptq": Solver("gptq", lambda w, h, args, p, work=None, scale=None, clip=None:
                   gptq_quantize_(w, h, args, p, work, scale, clip),
                   _gptq_params, lambda m, n: float(n) * n * (n / 3 + m)),
    "rtn": Solver("rtn", lambda w, h, args, p, work=None, scale=None, clip=None: rtn_quantize(w, args, scale, clip),
                  lambda q: None,
                  lambda m, n: float(n) * m),
}


def _staged_program(ctx, xs, carry):
    return ctx.arch.program(ctx, xs), carry


@dataclass(frozen=True)
class LayerSolver:
    name: str
    program: Callable[..., Any]  # (ctx, xs, carry) -> (xs, carry)
    start: Callable[[list], Any]  # the layer-0 inputs -> what is carried from layer to layer
    params: Callable[[Any], Any]  # QuantConfig -> frozen params
    cost: Callable[[int, int], float]  # (out_features, in_features) -> relative cost (owner plan: writes)
    check: Callable[..., None]  # (ArchSpec, QuantConfig) -> None, or raises UnsupportedModel
    memory: Callable[..., Any] | None = None  # (estimate.Shape, layer weights, inter) -> (bytes, parts)


def _autoround(attr: str):
    """A function of dist_quant/autoround_layer.py, imported when first called (that module
    imports the stage API, which imports this registry)."""
    def call(*a, **kw):
        from .. import autoround_layer

        return getattr(autoround_layer, attr)(*a, **kw)
    return call


def _autoround_memory(*a):
    from ..estimate import autoround_bytes

    return autoround_bytes(*a)


STAGED = LayerSolver("staged", _staged_program, lambda xs: None, lambda q: None, lambda m, n: 0.0,
                     lambda arch, q=None: None)
"""Every per-linear solver: the architecture's staged program, nothing carried."""

LAYER_SOLVERS: dict[str, LayerSolver] = {
    "autoround": LayerSolver("autoround", _autoround("program"), _autoround("start"), _autoround("params"),
                             lambda m, n: float(m) * n, _autoround("check_supported"), _autoround_memory),
}


def layer_solver(method: str) -> LayerSolver:
    """How a layer is quantized for ``quant.method``: its layer solver, or :data:`STAGED`."""
    return LAYER_SOLVERS.get(method, STAGED)


def method_names() -> tuple[str, ...]:
    """Every value ``quant.method`` accepts."""
    return (*SOLVERS, *LAYER_SOLVERS)


def solver_cost(method: str, out_f: int, in_f: int) -> float:
    """Relative cost of one linear under ``method`` (the owner plan balances it)."""
    entry = LAYER_SOLVERS.get(method) or get_solver(method)
    return entry.cost(out_f, in_f)


def solver_params(method: str, q) -> Any:
    """The frozen parameters of ``method`` (either kind) for QuantConfig ``q``."""
    entry = LAYER_SOLVERS.get(method) or get_solver(method)
    return entry.params(q)


def get_solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except KeyError:
        raise KeyError(f"unknown solver {name!r}; known: {', '.join(SOLVERS)}") from None


def _smoothquant(q, a_max, w_max, search):
    alpha = 0.5 if q.alpha is None else float(q.alpha)
    beta = round(1.0 - alpha, 6)
    return smoothquant_scales(a_max, w_max, alpha), alpha, beta, False, None


def _flex_smooth(q, a_max, w_max, search):
    alpha, beta, err, searched = q.alpha, q.beta, None, False
    if alpha is None or beta is None:
        alpha, beta, err = search(alpha)
        searched = True
    return flex_scales(a_max, w_max, alpha, beta), alpha, beta, searched, err


def _awq(q, x_mean, w_mean, search):
    if q.alpha is not None:  # given: no search
        return awq_scales(x_mean, w_mean, float(q.alpha), q.awq_duo_scaling), float(q.alpha), None, False, None
    alpha, _, err = search(None)
    return awq_scales(x_mean, w_mean, alpha, q.awq_duo_scaling), alpha, None, True, err


@dataclass(frozen=True)
class Smoother:
    choose: Callable[..., Any]  # (q, a, w, search) -> (s, alpha, beta, searched, rel_error)
    statistic: str = "absmax"  # "absmax" (W8A8 smoothers) or "absmean" (AWQ); see the module docstring
    weight_only: bool = False  # True: for weight-only jobs (AWQ); False: needs int8 activations

    def __call__(self, q, a, w, search):
        return self.choose(q, a, w, search)


SMOOTHERS: dict[str, Smoother] = {
    "smoothquant": Smoother(_smoothquant),
    "flex_smooth": Smoother(_flex_smooth),
    "awq": Smoother(_awq, statistic="absmean", weight_only=True),
}
SMOOTH_NONE = "none"


def smooth_methods() -> tuple[str, ...]:
    return (SMOOTH_NONE, *SMOOTHERS)
