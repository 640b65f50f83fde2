"""The run plan, computed identically on every rank from config.json and safetensors
headers only: layers, linears, the owner of every module and tensor, and the output
tensors each rank will write. Deterministic (sorted inputs, stable tie-breaks) so no
communication is needed to agree on it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .algorithms.registry import solver_cost
from .arch import ArchSpec, UnsupportedModel, get_arch
from .arch.moe import assign_expert_owners
from .checkpoint import Checkpoint, CheckpointError
from .config import ConfigError, QuantConfig


@dataclass(frozen=True)
class LinearInfo:
    name: str  # FQN without ".weight", e.g. model.layers.3.self_attn.q_proj
    layer: int
    stage: str
    out_features: int
    in_features: int
    has_bias: bool
    expert: int | None = None  # MoE: routed expert index (None: a dense linear, incl. shared experts)
    fallback: str | None = None  # "w8": int8 per-channel weights, float inputs (W8A16; dist_quant/fallback.py);
    # "w8a8": int8 per-channel weights with the job's activations (the non-expert linears of an Ascend W4A8 job)
    weight_only: bool = False  # an absorbed linear (ArchSpec.absorbed) in a static-activation job: float inputs

    @property
    def float_input(self) -> bool:
        """Its input is not quantized in an activation-quantized job: a ``w8`` fallback (W8A16) or
        a weight-only absorbed linear; ``w8a8`` linears (Ascend W4A8, formats/registry.py) see the
        job's quantized activations."""
        return self.fallback == "w8" or self.weight_only

    def solve_cost(self, method: str, pieces: int = 1) -> float:
        """Work of one owner's solve when the rows are split into ``pieces`` (GPTQ: every owner
        factors the whole Hessian, ``n³/3``, and runs the column loop on its rows, ``n² m/k``)."""
        return solver_cost(method, self.out_features / pieces, self.in_features)


@dataclass(frozen=True)
class Fallback:
    """One linear kept in higher precision (dist_quant/fallback.py)."""

    name: str
    to: str  # float | w8 | w8a8 (set by the output format: OutputFormat.plan_linears)
    reason: str  # disable_names | top-N | threshold | fused with <name>
    probe_error: float | None = None  # pre-pass relative output error (automatic fallback)


@dataclass(frozen=True)
class ModelPlan:
    arch: ArchSpec
    num_layers: int
    linears: tuple[LinearInfo, ...]
    layer_tensors: tuple[tuple[str, ...], ...]  # per layer: the other tensors (norms, ...)
    global_tensors: tuple[str, ...]  # embeddings, final norm, lm_head
    tied_embeddings: bool
    ignored: tuple[str, ...] = ()  # FQNs of linears left in float by quant.ignore
    kept: tuple[Fallback, ...] = ()  # linears kept in higher precision (quant.fallback, quant.disable_names)

    def layer_linears(self, layer: int) -> list[LinearInfo]:
        return [lin for lin in self.linears if lin.layer == layer]


def inspect_model(ckpt: Checkpoint, quant: QuantConfig, kept: dict[str, Fallback] | None = None) -> ModelPlan:
    """``kept``: the fallback decision (dist_quant/fallback.py), FQN → its :class:`Fallback`:
    ``float`` linears are left in float (like quant.ignore), ``w8`` ones get int8 weights."""
    kept = kept or {}
    keep = {name: f.to for name, f in kept.items()}
    cfg = ckpt.config
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str):
        raise UnsupportedModel(f"config.json in {str(ckpt.root)!r} has no model_type")
    arch = get_arch(model_type)
    num_layers = cfg.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise CheckpointError(f"config.json num_hidden_layers={num_layers!r} is not a positive integer")
    hidden = cfg.get("hidden_size")

    for name in (arch.embed, arch.final_norm):
        if name not in ckpt:
            raise CheckpointError(f"checkpoint lacks {name!r}")
    if arch.embed in ckpt and hidden is not None and ckpt.tensors[arch.embed].shape[-1] != hidden:
        raise CheckpointError(f"{arch.embed!r} has shape {list(ckpt.tensors[arch.embed].shape)} "
                              f"but config.json hidden_size={hidden}")

    nvfp4_act = getattr(quant, "act_type", "int") == "nvfp4"  # static input global scales: arch/moe_block.py
    absorbed = set(arch.absorbed) if absorbed_weight_only(quant) else set()
    if arch.moe is not None and getattr(quant, "act_bits", None) is not None and not quant.act_dynamic and not nvfp4_act:
        raise ConfigError(f"quant.act_dynamic=false with the MoE model_type={model_type!r}: routed experts "
                          "support dynamic per-token activations only (set quant.act_dynamic=true)")
    linears: list[LinearInfo] = []
    layer_tensors: list[tuple[str, ...]] = []
    ignore = set(quant.ignore) | (set(quant.moe_ignore) if arch.moe is not None else set())
    ignored: list[str] = []
    for i in range(num_layers):
        prefix = arch.layer_prefix(i)
        owned: set[str] = set()
        for stage in arch.layer_stages(i, cfg):
            for rel in stage.linears:
                fqn = prefix + rel
                wname = fqn + ".weight"
                if wname not in ckpt:
                    raise CheckpointError(f"checkpoint lacks {wname!r} (layer {i} of {num_layers})")
                shape = ckpt.tensors[wname].shape
                if len(shape) != 2:
                    raise CheckpointError(f"{wname!r} has shape {list(shape)}, expected a 2-D matrix")
                if rel.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) and hidden and shape[1] != hidden:
                    raise CheckpointError(f"{wname!r} has {shape[1]} input features but config.json "
                                          f"hidden_size={hidden}")
                if rel.split(".")[-1] in ignore or fqn in ignore or keep.get(fqn) == "float":
                    if stage.expert is not None:
                        raise ConfigError(f"quant.ignore/quant.moe_ignore match the routed expert linear {fqn!r}; "
                                          "routed experts are quantized whole (keep them out of the ignore lists)")
                    ignored.append(fqn)
                    continue  # stays a float tensor of the layer
                owned.add(wname)
                has_bias = fqn + ".bias" in ckpt
                if has_bias:
                    owned.add(fqn + ".bias")
                if getattr(quant, "weight_type", "int") in ("fp8", "nvfp4"):
                    pass  # FP8 blocks, NVFP4 groups of 16: formats/compressed_tensors_fp8.check_float_shapes
                elif quant.group_size != -1 and shape[1] % quant.group_size:
                    raise ConfigError(f"quant.group_size={quant.group_size} does not divide the "
                                      f"{shape[1]} input features of {fqn!r}; use a divisor or -1")
                linears.append(LinearInfo(fqn, i, stage.name, shape[0], shape[1], has_bias, stage.expert,
                                          keep.get(fqn), rel in absorbed))
        others = sorted(n for n in ckpt.tensors if n.startswith(prefix) and n not in owned)
        layer_tensors.append(tuple(others))

    in_layers = tuple(arch.layer_prefix(i) for i in range(num_layers))
    extra = extra_layers(arch, cfg, num_layers)  # MTP layers: written through, unquantized
    stray_layers = sorted(n for n in ckpt.tensors if n.startswith(arch.layers_prefix + ".")
                          and not n.startswith(in_layers) and not n.startswith(tuple(arch.layer_prefix(i)
                                                                                      for i in extra)))
    if stray_layers:
        raise CheckpointError(f"checkpoint has tensors of layers beyond num_hidden_layers={num_layers}, "
                              f"e.g. {stray_layers[0]!r}")
    global_tensors = tuple(sorted(n for n in ckpt.tensors if not n.startswith(in_layers)))
    tied = arch.lm_head not in ckpt
    ignored += [_layer_pattern(arch, i) for i in extra if any(n.startswith(arch.layer_prefix(i)) for n in ckpt.tensors)]
    return ModelPlan(arch, num_layers, tuple(linears), tuple(layer_tensors), global_tensors, tied, tuple(ignored),
                     tuple(kept[n] for n in sorted(kept)))


def absorbed_weight_only(quant) -> bool:
    """Whether the architecture's absorbed linears (``ArchSpec.absorbed``) are written weight-only:
    when the job's input scales are calibrated statically. vLLM dequantizes an absorbed linear by
    running its quantized method on the identity matrix (``get_and_maybe_dequant_weights``, generic
    case: "must be used with extra care when dealing with static activation quantization: quantizing
    1.0 may lead to over/underflows"): NVFP4 inputs turn each 1.0 into ``6 · e4m3(gs/6) / gs`` (off
    by the E4M3 rounding of the global scale ``gs``, saturated when ``gs/6 > 448``), so W_UK / W_UV
    would not be the written weights, and prefill (which runs kv_b_proj on quantized inputs) and
    decode would compute different models. Dynamic per-token int8 / FP8 scales map 1.0 to itself
    (up to float32 rounding of 1/127, 1/448)."""
    if getattr(quant, "act_bits", None) is None:
        return False
    return getattr(quant, "act_type", "int") == "nvfp4" or not quant.act_dynamic


def weight_only_targets(plan: "ModelPlan") -> list[str]:
    """compressed-tensors targets of the plan's weight-only linears: one anchored regex per layer-relative
    name (``re:.*\\.self_attn\\.kv_b_proj$``), which vLLM's ``find_matched_target`` tries before
    group_0's class target ``Linear`` (layer names first, compressed_tensors/utils.py)."""
    rels = {lin.name[len(plan.arch.layer_prefix(lin.layer)):] for lin in plan.linears if lin.weight_only}
    return ["re:.*\\." + re.escape(rel) + "$" for rel in sorted(rels)]


def extra_layers(arch: ArchSpec, config: dict, num_layers: int) -> range:
    """Indices of the layers stored after the decoder layers (``arch.extra_layers_key``)."""
    n = config.get(arch.extra_layers_key) if arch.extra_layers_key else None
    if n is not None and (not isinstance(n, int) or n < 0):
        raise CheckpointError(f"config.json {arch.extra_layers_key}={n!r} is not a number of layers")
    return range(num_layers, num_layers + (n or 0))


def _layer_pattern(arch: ArchSpec, index: int) -> str:
    """A compressed-tensors ``ignore`` entry for every module of layer ``index`` (a regex)."""
    return "re:" + arch.layer_prefix(index).replace(".", "[.]") + ".*"


RowPiece = tuple[int, int, int]  # (rank, first row, end row) of one owner's share of a linear
MIN_PIECE_ROWS = 128  # a row split never leaves an owner fewer rows than this
MIN_SPLIT_GAIN = 0.9  # one more piece must cut the owner's solve cost by at least 10 %


@dataclass(frozen=True)
class OwnerPlan:
    world_size: int
    owner: dict[str, int]  # linear FQN or tensor name → rank (a split linear: the rank that writes it)
    solve_cost: tuple[float, ...] = field(default=())  # per rank
    write_bytes: tuple[int, ...] = field(default=())  # per rank, input bytes of owned tensors
    rows: dict[str, tuple[RowPiece, ...]] = field(default_factory=dict)  # linears whose rows are split

    def owned_by(self, rank: int) -> list[str]:
        return [name for name, r in self.owner.items() if r == rank]

    def pieces(self, lin: LinearInfo) -> tuple[RowPiece, ...]:
        """Who solves which rows of ``lin`` (one piece, all rows, unless it is split)."""
        return self.rows.get(lin.name) or ((self.owner[lin.name], 0, lin.out_features),)

    def solvers(self, lin: LinearInfo) -> list[int]:
        return [p[0] for p in self.pieces(lin)]


def row_pieces(linears: list[LinearInfo], world_size: int, method: str) -> dict[str, int]:
    """How many row pieces each linear of one stage is split into. GPTQ treats rows
    independently given the Hessian, so a stage with fewer linears than ranks (e.g. the
    lone ``down_proj``) lets idle ranks take rows of its widest linears: each extra owner
    holds the (shared) Hessian and factors it too, but solves and holds only its rows,
    so the stage's longest solve and the largest weight on one rank both shrink. Greedy:
    the piece with the largest cost gets one more owner while ranks are idle, the pieces
    keep ``MIN_PIECE_ROWS`` rows and the cost drops by ``1 − MIN_SPLIT_GAIN`` at least.
    Pure and deterministic (ties by name)."""
    k = {lin.name: 1 for lin in linears}
    if method != "gptq":  # RTN's solve is elementwise: nothing to share
        return k
    spare = world_size - len(linears)
    while spare > 0:
        lin = max(linears, key=lambda x: (x.solve_cost(method, k[x.name]), x.name))
        more = k[lin.name] + 1
        if (lin.out_features // more < MIN_PIECE_ROWS
                or lin.solve_cost(method, more) > MIN_SPLIT_GAIN * lin.solve_cost(method, k[lin.name])):
            break
        k[lin.name] = more
        spare -= 1
    return k


def assign_owners(plan: ModelPlan, ckpt: Checkpoint, world_size: int, method: str) -> OwnerPlan:
    """Greedy longest-processing-time bin packing, stage by stage, so that the solves that
    run concurrently are balanced; other tensors are balanced by bytes to write."""
    owner: dict[str, int] = {}
    cost = [0.0] * world_size
    nbytes = [0] * world_size
    groups: dict[tuple[int, str], list[LinearInfo]] = {}
    for lin in plan.linears:
        if lin.expert is None:  # routed experts: owned per expert, below
            groups.setdefault((lin.layer, lin.stage), []).append(lin)
    rows: dict[str, tuple[RowPiece, ...]] = {}
    for key in sorted(groups, key=lambda k: (k[0], [s.name for s in plan.arch.stages].index(k[1]))):
        stage_cost = [0.0] * world_size
        split = row_pieces(groups[key], world_size, method)
        for lin in sorted(groups[key], key=lambda x: (-x.solve_cost(method, split[x.name]), x.name)):
            k = split[lin.name]
            c = lin.solve_cost(method, k)
            taken: list[int] = []
            for _ in range(k):  # each piece on a different rank
                r = min((x for x in range(world_size) if x not in taken), key=lambda x: (stage_cost[x], cost[x], x))
                taken.append(r)
                stage_cost[r] += c
                cost[r] += c
            owner[lin.name] = taken[0]
            if k > 1:
                m = lin.out_features
                rows[lin.name] = tuple((r, j * m // k, (j + 1) * m // k) for j, r in enumerate(taken))
            nbytes[taken[0]] += ckpt.tensors[lin.name + ".weight"].nbytes
    assign_expert_owners([lin for lin in plan.linears if lin.expert is not None], world_size, method, owner,
                         cost, nbytes, lambda lin: ckpt.tensors[lin.name + ".weight"].nbytes)
    linear_weights = {lin.name + ".weight" for lin in plan.linears}
    rest = [n for grp in plan.layer_tensors for n in grp] + list(plan.global_tensors)
    for name in sorted(rest, key=lambda n: (-ckpt.tensors[n].nbytes, n)):
        base = name.rsplit(".", 1)[0]
        if name.endswith(".bias") and base in owner:
            owner[name] = owner[base]  # a quantized linear's bias lives with it
            continue
        if name in linear_weights:
            continue
        r = min(range(world_size), key=lambda k: (nbytes[k], k))
        owner[name] = r
        nbytes[r] += ckpt.tensors[name].nbytes
    return OwnerPlan(world_size, owner, tuple(cost), tuple(nbytes), rows)
