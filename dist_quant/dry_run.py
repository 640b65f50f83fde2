"""``dry_run=true``: the plan from config.json and safetensors headers only, for any world size."""
from __future__ import annotations

from .config import JobConfig


def dry_run(cfg: JobConfig, world_size: int) -> int:
    from .pipeline import output_specs
    from .run import output_dir, prepare
    from .writer import plan_parts

    model_path = cfg.model.path
    if not model_path:
        from .demo_model import ensure_demo_checkpoint

        model_path = str(ensure_demo_checkpoint())
    ckpt, plan, owners, args = prepare(cfg, model_path, world_size)
    from .formats.registry import make_format

    fmt = make_format(cfg, args)
    parts = plan_parts(output_specs(plan, owners, ckpt, args, fmt), cfg.output.part_file_bytes, prefix=fmt.part_prefix)
    print(f"model {model_path}: {plan.arch.name}, {plan.num_layers} layers, {len(plan.linears)} quantized linears")
    print(f"world size {world_size}; output {output_dir(cfg, model_path)} in {len(parts)} part files, "
          f"{sum(p.nbytes for p in parts) / 1e6:.1f} MB")
    for r in range(world_size):
        mine = [p for p in parts if p.rank == r]
        print(f"rank {r}: {sum(1 for l in plan.linears if owners.owner[l.name] == r)} linears, "
              f"{len(mine)} part files, {sum(p.nbytes for p in mine) / 1e6:.1f} MB to write")
    for lin in plan.linears:
        print(f"  {lin.name} [{lin.out_features}x{lin.in_features}] -> rank {owners.owner[lin.name]}")
    return 0
