"""Registries of the algorithms a job can name: weight solvers (``quant.method`` /
``quant.weight_solver``) and activation smoothers (``quant.smooth``). Config validation
reads their keys; the stage API (dist_quant/stage.py) looks the chosen one up. Adding a
solver is one entry here plus its pure function in its own file.

A solver is ``solve(W, H, args, params, work, scale) -> QuantResult`` (``W`` float32 [out, in], ``H`` the
normalized Hessian of the inputs, float32, used as scratch and restored; ``work`` a buffer of
its shape the solver may overwrite, or None; ``scale``: the fixed FP8-grid scales, or None), ``params(quant_config)`` builds its frozen
parameters once per job, and ``cost(out, in)`` is the relative solve cost the owner plan
balances.

A smoother chooses per-channel scales ``s`` for one smoothing pair:
``smoother(q, a_max, w_max, search) -> (s, alpha, beta, searched, rel_error)``, where
``q`` is the QuantConfig and ``search(alpha)`` runs the two-stage (alpha, beta) search
when the smoother asks for one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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
    return GPTQParams(damp=q.damp, block_size=q.block_size, act_order=q.act_order)


SOLVERS: dict[str, Solver] = {
    "gptq": Solver("gptq", lambda w, h, args, p, work=None, scale=None: gptq_quantize_(w, h, args, p, work, scale),
                   _gptq_params, lambda m, n: float(n) * n * (n / 3 + m)),
    "rtn": Solver("rtn", lambda w, h, args, p, work=None, scale=None: rtn_quantize(w, args, scale), lambda q: None,
                  lambda m, n: float(n) * m),
}


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


SMOOTHERS: dict[str, Callable[..., Any]] = {"smoothquant": _smoothquant, "flex_smooth": _flex_smooth}
SMOOTH_NONE = "none"


def smooth_methods() -> tuple[str, ...]:
    return (SMOOTH_NONE, *SMOOTHERS)
