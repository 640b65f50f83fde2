"""Mixture-of-experts architectures as data: where the MoE block, its router, its routed
experts and (qwen2_moe) its shared expert are in the *checkpoint*, and which decoder
layers are sparse.

transformers 5 fuses the experts in memory (``experts.gate_up_proj [E, 2·I, H]``,
``experts.down_proj [E, H, I]``; Mixtral's ``block_sparse_moe`` becomes ``mlp``) and
converts on load and save. dist_quant plans from the checkpoint keys instead: every
expert's matrices are ordinary 2-D linears under their checkpoint names
(``mlp.experts.{e}.gate_proj`` …, ``block_sparse_moe.experts.{e}.w1`` …), quantized and
written back under those names.

Stages of a sparse layer (their inputs, in order):

* ``attn_in``, ``attn_out``: as in a dense layer;
* ``moe_in``: the router, the shared expert's gate/up and ``shared_expert_gate``, all
  reading the normed hidden state ``h`` of every token;
* ``shared_out``: the shared expert's down projection (all tokens);
* ``expert_in`` / ``expert_out`` (one pair per expert ``e``): gate/up read the tokens
  routed to ``e``, down reads ``act(gate)·up`` of those tokens. These linears are owned
  per expert (all three on one rank), see :func:`assign_expert_owners`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import DENSE_STAGES, ArchSpec, Stage, UnsupportedModel
from .moe_block import program as moe_program


@dataclass(frozen=True)
class MoeSpec:
    block: str  # checkpoint name of the MoE block inside a layer: "mlp", "block_sparse_moe"
    num_experts_keys: tuple[str, ...]  # config.json keys of the number of routed experts (first present)
    expert_gate: str  # act(gate x) · up x → down
    expert_up: str
    expert_down: str
    router: str = "gate"
    experts: str = "experts"
    shared: str | None = None  # shared expert MLP (gate_proj, up_proj, down_proj): qwen2_moe, glm4_moe
    shared_gate: str | None = None  # qwen2_moe: sigmoid gate of the shared expert, a [1, hidden] linear
    # (glm4_moe has none: the shared experts' output is added as it is)
    sparse_step_key: str | None = None  # qwen: layer i is sparse iff (i + 1) % step == 0 ...
    mlp_only_key: str | None = None  # ... and i is not listed here
    first_dense_key: str | None = None  # glm4_moe / deepseek: layers i < config[key] are dense

    def _configured(self, config: dict):
        return next((config[k] for k in self.num_experts_keys if k in config), None)

    def num_experts(self, config: dict) -> int:
        n = self._configured(config)
        if not isinstance(n, int) or n <= 0:
            raise UnsupportedModel(f"config.json {'/'.join(self.num_experts_keys)}={n!r} is not a positive "
                                   "number of experts")
        return n

    def is_sparse(self, index: int, config: dict) -> bool:
        """The rule transformers uses to build layer ``index`` with an MoE block."""
        if self.mlp_only_key and index in (config.get(self.mlp_only_key) or ()):
            return False
        if self.first_dense_key and index < int(config.get(self.first_dense_key) or 0):
            return False
        if self.sparse_step_key:
            step = config.get(self.sparse_step_key) or 1
            return (self._configured(config) or 0) > 0 and (index + 1) % step == 0
        return True

    def expert_prefix(self, expert: int) -> str:
        return f"{self.block}.{self.experts}.{expert}."

    @property
    def router_name(self) -> str:
        return f"{self.block}.{self.router}"

    def expert_linears(self, expert: int) -> tuple[str, str, str]:
        p = self.expert_prefix(expert)
        return p + self.expert_gate, p + self.expert_up, p + self.expert_down

    def expert_of(self, rel: str) -> int | None:
        m = re.match(re.escape(f"{self.block}.{self.experts}.") + r"(\d+)\.", rel)
        return int(m.group(1)) if m else None


MOE_STAGE_NAMES = ("moe_in", "shared_out", "expert_in", "expert_out")


@dataclass(frozen=True)
class MoeArchSpec(ArchSpec):
    moe: MoeSpec | None = None

    def layer_stages(self, index: int, config: dict) -> tuple[Stage, ...]:
        m = self.moe
        if not m.is_sparse(index, config):
            return DENSE_STAGES
        b = m.block
        moe_in = [m.router_name]
        stages = list(DENSE_STAGES[:2])
        if m.shared:
            moe_in += [f"{b}.{m.shared}.gate_proj", f"{b}.{m.shared}.up_proj"]
            moe_in += [f"{b}.{m.shared_gate}"] if m.shared_gate else []
        stages.append(Stage("moe_in", tuple(moe_in)))
        if m.shared:
            stages.append(Stage("shared_out", (f"{b}.{m.shared}.down_proj",)))
        for e in range(m.num_experts(config)):
            gate, up, down = m.expert_linears(e)
            stages += [Stage("expert_in", (gate, up), expert=e), Stage("expert_out", (down,), expert=e)]
        return tuple(stages)

    def loaded_later(self, name: str) -> bool:
        return name.startswith(f"{self.mlp}.{self.moe.experts}.")

    def memory_name(self, rel: str) -> str:
        block = self.moe.block
        if block != self.mlp and (rel == block or rel.startswith(block + ".")):
            return self.mlp + rel[len(block):]
        return rel

    def checkpoint_name(self, rel: str) -> str:
        block = self.moe.block
        if block != self.mlp and (rel == self.mlp or rel.startswith(self.mlp + ".")):
            return block + rel[len(self.mlp):]
        return rel


def _stages_for_order(moe: MoeSpec) -> tuple[Stage, ...]:
    """Every stage name in processing order (used to order the owner plan's groups)."""
    return DENSE_STAGES + tuple(Stage(name, ()) for name in MOE_STAGE_NAMES)


# transformers 5 writes num_local_experts (num_experts is an alias); hub checkpoints have num_experts
_QWEN_KEYS = ("num_experts", "num_local_experts")
_QWEN = MoeSpec(block="mlp", num_experts_keys=_QWEN_KEYS, expert_gate="gate_proj", expert_up="up_proj",
                expert_down="down_proj", sparse_step_key="decoder_sparse_step", mlp_only_key="mlp_only_layers")
_QWEN2 = MoeSpec(block="mlp", num_experts_keys=_QWEN_KEYS, expert_gate="gate_proj", expert_up="up_proj",
                 expert_down="down_proj", shared="shared_expert", shared_gate="shared_expert_gate",
                 sparse_step_key="decoder_sparse_step", mlp_only_key="mlp_only_layers")
# GLM-4.5 / 4.6 / 4.5-Air: sigmoid router with e_score_correction_bias (a buffer of mlp.gate, written
# through), shared experts without a gate, the first first_k_dense_replace layers dense
_GLM4 = MoeSpec(block="mlp", num_experts_keys=("n_routed_experts",), expert_gate="gate_proj", expert_up="up_proj",
                expert_down="down_proj", shared="shared_experts", first_dense_key="first_k_dense_replace")
_MIXTRAL = MoeSpec(block="block_sparse_moe", num_experts_keys=("num_local_experts",), expert_gate="w1",
                   expert_up="w3", expert_down="w2")

MOE_ARCHS: dict[str, ArchSpec] = {
    name: MoeArchSpec(name=name, stages=_stages_for_order(spec), moe=spec, program=moe_program, **extra)
    for name, spec, extra in (("qwen2_moe", _QWEN2, {}), ("qwen3_moe", _QWEN, {}), ("mixtral", _MIXTRAL, {}),
                              ("glm4_moe", _GLM4, {"extra_layers_key": "num_nextn_predict_layers"}))
}


def assign_expert_owners(experts, world_size: int, method: str, owner: dict, cost: list, nbytes: list,
                         weight_bytes) -> None:
    """Owners of routed experts: all linears of one expert on one rank (its tokens go
    there once). Layer by layer, experts (largest solve cost first, then by index) go to
    the rank with the fewest experts of that layer, then the least total solve cost, then
    the lowest rank: every rank holds at most ceil(E / N) experts of a layer, and the
    remainders rotate over ranks across layers. Deterministic. Updates ``owner``,
    ``cost`` and ``nbytes`` in place."""
    groups: dict[tuple[int, int], list] = {}
    for lin in experts:
        groups.setdefault((lin.layer, lin.expert), []).append(lin)
    for layer in sorted({k[0] for k in groups}):
        count = [0] * world_size
        keys = [k for k in groups if k[0] == layer]
        solve = {k: sum(lin.solve_cost(method) for lin in groups[k]) for k in keys}
        for key in sorted(keys, key=lambda k: (-solve[k], k[1])):
            r = min(range(world_size), key=lambda k: (count[k], cost[k], k))
            count[r] += 1
            cost[r] += solve[key]
            for lin in groups[key]:
                owner[lin.name] = r
                nbytes[r] += weight_bytes(lin)
