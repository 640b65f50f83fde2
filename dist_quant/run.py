"""One quantization job from a typed config: prepare → plan → layer loop → finish.

Work happens in ``<output.dir>.partial``; rank 0 moves it into place only once every
rank has written its part files and the index, config and report exist."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from . import actdtype, offload
from .algorithms.registry import layer_solver
from .calibration import CalibrationError, CalibrationSet, rank_rows
from .calib_sources import load_calibration, load_smooth_calibration
from .checkpoint import Checkpoint
from .config import ConfigError, JobConfig
from .fallback import decide, manual_plan, report_section
from .formats.registry import make_format
from .formats.serving import serving_dtype
from .formats.compressed_tensors_fp8 import check_float_shapes
from .memory import peak_rss_bytes
from .servability import job_of, plan_warnings, refuse
from .pipeline import LayerwiseQuantizer, output_specs
from .plan import ModelPlan, OwnerPlan, assign_owners, inspect_model
from .preflight import preflight
from .progress import LayerProgress
from .quant.qparams import QuantArgs
from .report import build_report, peak_device_bytes, write_report
from .resume import Progress, discard_state, fingerprint
from .runtime import Comm
from .writer import RankWriter, plan_parts

log = logging.getLogger("dist_quant")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json", "tiktoken.model")


def tokenizer_code_files(root: Path) -> list[str]:
    """Python files named by tokenizer_config.json's ``auto_map`` (Kimi-K2's
    ``tokenization_kimi.py``): copied to the output (never imported here), so that the output's
    tokenizer loads where the source's did."""
    path = root / "tokenizer_config.json"
    try:
        auto = json.loads(path.read_text()).get("auto_map") or {} if path.is_file() else {}
    except (OSError, ValueError):
        return []
    refs = [r for v in auto.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    files = {r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs}
    return sorted(f for f in files if "/" not in f and (root / f).is_file())


def resolve_model_path(cfg: JobConfig, comm: Comm) -> str:
    if cfg.model.path:
        return cfg.model.path
    from .demo import demo_checkpoint_or_error  # the embedded demo model

    # rank 0 converts it once; the others wait, and every rank fails alike if it cannot
    path, error = comm.decide(demo_checkpoint_or_error)
    if error:
        raise ConfigError(error)
    return path


def output_dir(cfg: JobConfig, model_path: str) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    return Path("outputs") / f"{Path(model_path).resolve().name}-{cfg.quant.name}"


def check_output_dir(final: Path, model_dir: Path, overwrite: bool) -> None:
    if final.resolve() == model_dir.resolve() or model_dir.resolve() in final.resolve().parents:
        raise ConfigError(f"output.dir={str(final)!r} is inside the model directory; choose another place")
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise ConfigError(f"output.dir={str(final)!r} exists and is not empty (set output.overwrite=true "
                          "to replace it)")
    if final.resolve() in model_dir.resolve().parents:
        raise ConfigError(f"output.dir={str(final)!r} contains the model directory; choose another place")
    if final.exists() and not final.is_dir():
        raise ConfigError(f"output.dir={str(final)!r} exists and is not a directory")
    parent = final.resolve().parent
    probe = parent / f".dist_quant_write_test_{time.time_ns()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output.dir={str(final)!r} is not writable: {exc.strerror or exc}") from None


def quant_args(cfg: JobConfig, ckpt: Checkpoint, plan: ModelPlan) -> QuantArgs:
    first = plan.linears[0].name + ".weight" if plan.linears else None
    dtype = ckpt.tensors[first].dtype if first else "F32"
    setting = cfg.output.dtype
    if setting == "auto":
        from .formats.registry import AUTO_DTYPE

        setting = AUTO_DTYPE.get(cfg.output.format, setting)
    scale_dtype = serving_dtype(setting, dtype)  # scales are rounded to the serving dtype
    q = cfg.quant
    if q.weight_type == "nvfp4":  # effective scales float32; stored as E4M3 group scales + a global scale
        return QuantArgs(4, 16, True, torch.float32, grid="nvfp4")
    if q.weight_type == "fp8":  # FP8 scales are float32 (vLLM's weight_scale parameters are float32)
        return QuantArgs(8, q.group_size, True, torch.float32, grid="fp8", fp8_strategy=q.weight_strategy)
    return QuantArgs(q.bits, q.group_size, q.symmetric, scale_dtype, mse=q.observer == "mse", mse_norm=q.mse_norm)


def prepare(cfg: JobConfig, model_path: str, world_size: int):
    """Everything that needs no weights: checkpoint headers, model plan, owners, args."""
    if cfg.model.trust_remote_code:
        raise ConfigError("model.trust_remote_code=true: dist_quant never runs code from a checkpoint; "
                          "only built-in architectures are supported")
    ckpt = Checkpoint(model_path, allow_pickle=cfg.model.allow_pickle)
    plan = manual_plan(ckpt, cfg.quant)  # quant.disable_names applied (dist_quant/fallback.py)
    layer_solver(cfg.quant.method).check(plan.arch, cfg.quant)  # a layer solver's unsupported architectures: one line
    args = quant_args(cfg, ckpt, plan)
    refuse(job_of(cfg, plan, args.scale_dtype))  # outputs no server could load: one line, before any work
    check_float_shapes(cfg, plan)  # block FP8: 128-multiples, one line, before any work
    actdtype.check(cfg, plan)  # model.activation_dtype: the programs it is wired for, one line
    offload.check(cfg, plan)  # runtime.offload=host: the same programs, one line
    plan = format_plan(cfg, ckpt, plan, args)  # the output format's own per-linear precisions
    owners = assign_owners(plan, ckpt, world_size, cfg.quant.method)
    return ckpt, plan, owners, args


def format_plan(cfg: JobConfig, ckpt: Checkpoint, plan: ModelPlan, args: QuantArgs) -> ModelPlan:
    """The plan with the linears the output format writes at another precision
    (``OutputFormat.plan_linears``: Ascend's float kv_b_proj, W4A8's int8 non-expert linears)."""
    extra = {n: f for n, f in make_format(cfg, args).plan_linears(plan).items()
             if n not in {k.name for k in plan.kept}}  # the user's fallbacks (quant.disable_names) win
    if not extra:
        return plan
    return inspect_model(ckpt, cfg.quant, {**{k.name: k for k in plan.kept}, **extra})


def log_owner_plan(plan: ModelPlan, owners: OwnerPlan) -> None:
    for r in range(owners.world_size):
        mods = [lin.name for lin in plan.linears if owners.owner[lin.name] == r]
        log.info("owner plan: rank %d solves %d linears (cost %.3g), writes %.1f MB of input tensors",
                 r, len(mods), owners.solve_cost[r], owners.write_bytes[r] / 1e6)
    for lin in plan.linears:
        log.debug("owner plan: %s -> rank %d", lin.name, owners.owner[lin.name])


def tokenizer_factory(root: Path):
    """The checkpoint's tokenizer, loaded when a calibration format first needs one."""
    def load():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(root), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 -- any failure becomes the one line below
            first = (str(exc).strip().splitlines() or [""])[0]
            raise CalibrationError(
                f"model.path={str(root)!r}: no tokenizer that loads without remote code ({type(exc).__name__}: "
                f"{first}); calibrate on pre-tokenized ids instead (calib.format=ids or safetensors, "
                "see docs/calibration.md)") from None
    return load


def read_calibration(cfg: JobConfig, ckpt: Checkpoint) -> tuple[CalibrationSet, CalibrationSet | None]:
    """The global calibration set and the separate smoothing set (calib.smooth_path), read
    identically by every rank; the tokenizer is loaded only if a format needs it."""
    default_text = None
    if cfg.calib.path is None:
        from .demo_data import demo_calibration_text

        default_text = demo_calibration_text()
    load, tok_box = tokenizer_factory(ckpt.root), {}

    def shared():  # one tokenizer for both sets
        if "tok" not in tok_box:
            tok_box["tok"] = load()
        return tok_box["tok"]

    kw = dict(tokenizer_factory=shared, seed=cfg.seed, vocab_size=ckpt.config.get("vocab_size"))
    calib = load_calibration(cfg.calib, None, default_text, **kw)
    smooth = load_smooth_calibration(cfg.calib, **kw)
    return calib, smooth


def run_job(cfg: JobConfig, comm: Comm, device: torch.device, run_dir: Path) -> Path:
    t_start = time.time()
    model_path = resolve_model_path(cfg, comm)
    ckpt, plan, owners, args = prepare(cfg, model_path, comm.world_size)
    fmt = make_format(cfg, args, plan)  # checks output.format against the preset
    final = output_dir(cfg, model_path)
    check_output_dir(final, ckpt.root, cfg.output.overwrite)
    partial = final.parent / (final.name + ".partial")
    parts = plan_parts(output_specs(plan, owners, ckpt, args, fmt), cfg.output.part_file_bytes,
                       prefix=fmt.part_prefix)
    preflight(cfg, comm, ckpt, parts, partial)
    log_owner_plan(plan, owners)
    if comm.rank == 0:
        for line in plan_warnings(cfg, plan, args.scale_dtype):  # which servers can serve the output
            log.warning(line)

    calib, smooth_set = read_calibration(cfg, ckpt)
    mine = calib.rank_slice(comm.rank, comm.world_size, cfg.calib.batch_size)
    log.info("calibration: %d samples x %d tokens (%d real tokens); this rank: %d samples",
             calib.input_ids.shape[0], calib.input_ids.shape[1], calib.tokens, mine.input_ids.shape[0])
    smooth = None
    if smooth_set is not None:  # the smoothing lane (dist_quant/stage.py): its own rank slice
        n = smooth_set.input_ids.shape[0]
        smooth = (smooth_set.rank_slice(comm.rank, comm.world_size, cfg.calib.batch_size), n,
                  rank_rows(n, comm.rank, comm.world_size, cfg.calib.batch_size)[0])
        log.info("smoothing set (calib.smooth_path): %d samples x %d tokens (%d real tokens); this rank: %d "
                 "samples", n, smooth_set.input_ids.shape[1], smooth_set.tokens, smooth[0].input_ids.shape[0])

    probe = None
    if cfg.quant.fallback.automatic:  # the sensitivity pre-pass decides, then the job is planned again
        base = inspect_model(ckpt, cfg.quant)
        chosen, probe = decide(cfg, comm, ckpt, base, assign_owners(base, ckpt, comm.world_size, cfg.quant.method), args,
                        device, mine, {f.name: f for f in plan.kept})
        plan = inspect_model(ckpt, cfg.quant, chosen)
        owners = assign_owners(plan, ckpt, comm.world_size, cfg.quant.method)
        fmt = make_format(cfg, args, plan)
        parts = plan_parts(output_specs(plan, owners, ckpt, args, fmt), cfg.output.part_file_bytes,
                           prefix=fmt.part_prefix)
        preflight(cfg, comm, ckpt, parts, partial)
    writer = RankWriter(partial, parts, comm.rank)
    resume = Progress(partial, comm, writer, plan.num_layers)  # wipes or continues `partial`
    resume.begin(cfg.resume, fingerprint(cfg, ckpt, comm.world_size, calib))
    progress = LayerProgress(plan.num_layers, comm.rank)
    try:
        records = LayerwiseQuantizer(cfg, comm, ckpt, plan, owners, args, device, writer).run(
            mine, progress, resume, smooth)
        weight_map = writer.finish()
    finally:
        writer.abort()
        progress.close()
    peak_rss = peak_rss_bytes()
    gathered = comm.gather_object({"weight_map": weight_map, "records": [_record_dict(r) for r in records],
                                   "peak_rss_bytes": peak_rss, "peak_device_bytes": peak_device_bytes(device),
                                   "rank": comm.rank}, 0)
    comm.rank0(_finish, cfg, ckpt, plan, owners, fmt, parts, gathered, partial, final, t_start, model_path, probe)
    comm.barrier()
    ckpt.close()
    return final


def _record_dict(record) -> dict:
    extra = {"moe": record.moe} if getattr(record, "moe", None) else {}
    return {"layer": record.layer, "seconds": dict(record.seconds), "modules": record.modules,
            "smoothing": record.smoothing, **extra}


def _finish(cfg, ckpt, plan, owners, fmt, parts, gathered, partial: Path, final: Path, t_start, model_path,
            probe=None):
    weight_map: dict[str, str] = {}
    for g in gathered:
        clash = set(weight_map) & set(g["weight_map"])
        if clash:
            raise RuntimeError(f"tensor written by two ranks: {sorted(clash)[0]!r}")
        weight_map.update(g["weight_map"])
    fmt.finish(partial, parts, weight_map, ckpt.output_config(),
               ["lm_head", *plan.ignored],
               [lin.name for lin in plan.linears])
    for name in (*TOKENIZER_FILES, *tokenizer_code_files(ckpt.root)):
        if (ckpt.root / name).is_file():
            shutil.copy2(ckpt.root / name, partial / name)
    report = build_report(cfg, plan, owners, gathered, time.time() - t_start, model_path, parts, final)
    if plan.arch.moe is not None:
        from .moe_report import log_moe_summary, moe_report

        report["moe"] = moe_report(gathered)
        log_moe_summary(report["moe"])
    if plan.kept or probe is not None:
        errors = {n: m["rel_output_error"] for g in gathered for r in g["records"] for n, m in r["modules"].items()}
        report["fallback"] = report_section(cfg, plan.kept, probe, errors)
    write_report(partial, report)
    discard_state(partial)  # complete: nothing left to resume
    if final.exists():
        trash = final.parent / (final.name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        partial.rename(final)
        shutil.rmtree(trash)
    else:
        partial.rename(final)
    errors = [m["rel_output_error"] for g in gathered for r in g["records"] for m in r["modules"].values()]
    log.info("wrote %s: %d part files, %d tensors, %.1f MB in %.1f s; mean relative output error %.4g",
             final, len(parts), len(weight_map), sum(p.nbytes for p in parts) / 1e6, time.time() - t_start,
             sum(errors) / max(len(errors), 1))

