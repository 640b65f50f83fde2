"""Entry point: ``python -m dist_quant KEY=VALUE…`` / ``torchrun … -m dist_quant …`` /
``srun python -m dist_quant …`` / ``deepspeed --module dist_quant …``."""
from __future__ import annotations

import gc
import logging
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the command (not an import):
    from .memory import huge_pages_or_reexec

    huge_pages_or_reexec()  # restarted once with huge pages for malloc (memory.py), before torch loads
    gc.disable()  # no collections while the imports run (they make millions of long-lived objects; see main)

from .arch import UnsupportedModel
from .calibration import CalibrationError
from .checkpoint import CheckpointError
from .cli import CliError
from .config import ConfigError
from . import stop

# runtime.DeviceError (an unusable device or backend) is a ConfigError: it names the setting.
USER_ERRORS = (ConfigError, CheckpointError, CalibrationError, UnsupportedModel, CliError)
log = logging.getLogger("dist_quant")


def split_launcher_args(argv: list[str]) -> tuple[list[str], int | None]:
    """Drop DeepSpeed's ``--local_rank=N`` / ``--local_rank N``; the rest are Hydra overrides."""
    overrides, local_rank, skip = [], None, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            local_rank = int(arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            local_rank, skip = int(argv[i + 1]), True
        else:
            overrides.append(arg)
    return overrides, local_rank


def setup_logging(rank: int, run_dir: Path | None) -> None:
    root = logging.getLogger("dist_quant")
    root.setLevel(logging.DEBUG)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    root.addHandler(console)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / f"rank{rank}.log")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(fmt)
        root.addHandler(fh)


def user_error(exc: Exception, rank: int) -> int:
    """A bad setting or input: one line on stderr (no traceback), the rank's log file, exit 2."""
    message = " ".join(str(exc).split())
    log.debug("error: %s", message)  # file only: the console handlers start at INFO
    print(f"error: {message}" if rank == 0 else f"error: [rank {rank}] {message}", file=sys.stderr)
    return 2


def print_only(flags, composed, overrides: list[str]) -> int:
    """``--help`` / ``--info`` / ``--cfg``: print and stop (no process group, no work)."""
    from .cli import cfg_text, help_text, info_text
    from .settings import CONF_DIR

    if flags.help:
        text = help_text(CONF_DIR, composed)
    elif flags.info:
        text = info_text(CONF_DIR, composed, overrides)
    else:
        text = cfg_text(composed, flags.cfg, flags.resolve, overrides)
    sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    overrides, local_rank_arg = split_launcher_args(list(sys.argv[1:] if argv is None else argv))
    from .runtime import rank_info_from_env

    info = rank_info_from_env(local_rank_arg=local_rank_arg)
    setup_logging(info.rank, None)
    try:
        from .cli import parse_flags, with_rerun
        from .settings import compose_job, to_job_config

        flags = parse_flags(overrides)
        overrides = with_rerun(flags)
        composed = compose_job(overrides)
        if flags.prints_only:
            return print_only(flags, composed, overrides) if info.rank == 0 else 0
        cfg = to_job_config(composed)
    except USER_ERRORS as exc:
        return user_error(exc, info.rank)

    if cfg.dry_run:
        from .dry_run import dry_run

        if info.rank != 0:  # started by a launcher: one plan is enough
            return 0
        try:
            return dry_run(cfg, cfg.runtime.world_size or info.world_size)
        except USER_ERRORS as exc:
            return user_error(exc, info.rank)

    import torch

    from .runtime import Comm, resolve_backend, resolve_device

    comm = None
    t_start = time.time()
    try:
        device = resolve_device(cfg.runtime.device, info.local_rank)
        backend = resolve_backend(cfg.runtime.backend, device)
        if cfg.quant.kernel in ("triton", "numba"):  # asked for by name: an error now where it cannot run
            from .algorithms.gptq import column_kernel

            column_kernel(cfg.quant.kernel, device)
        if device.type == "cpu":
            threads = cfg.runtime.threads or max(1, (os.cpu_count() or 1) // max(1, info.local_world_size))
            torch.set_num_threads(threads)
        comm = Comm(info, device, backend)
        comm.init(cfg.runtime.timeout_s)
        run_dir = Path(cfg.runtime.run_dir) if cfg.runtime.run_dir else None
        if run_dir is None:
            run_dir = Path(comm.decide(lambda: time.strftime("runs/%Y-%m-%d_%H-%M-%S")))
        setup_logging(info.rank, run_dir)
        if info.rank == 0:  # .hydra/config.yaml + overrides.yaml: the run can be repeated from here
            from .cli import write_run_record

            write_run_record(run_dir, composed, overrides)
        log.info("dist_quant: world size %d (%s), device %s, backend %s, run dir %s",
                 info.world_size, info.launcher, device, backend, run_dir)
        from .memory import huge_pages_on

        log.info("host heap: runtime.heap=%s, malloc huge pages %s", cfg.runtime.heap,
                 "on" if huge_pages_on() else "off")
        from .failure import Watch
        from .run import run_job

        # the objects made so far (millions: torch's, transformers' and compressed-tensors'
        # modules) stay out of the collector's passes: on the SmolLM2 32 x 512 job its 8 full
        # passes, most of them during the imports, cost 0.94 s
        gc.freeze()
        gc.enable()
        if cfg.runtime.heap == "keep":  # freed activations stay in the heap for the next stage (memory.py)
            from .memory import keep_heap

            keep_heap()

        # any rank's failure stops every rank, with its error shown; SIGTERM/SIGUSR1 stop every
        # rank after the last completed layer
        with stop.Handlers(), Watch(comm):
            final = run_job(cfg, comm, device, run_dir)
        if info.rank == 0:
            print(f"done: {final}")
    except USER_ERRORS as exc:
        return user_error(exc, info.rank)
    except stop.Stopped as exc:
        # rank 0 on the console; every rank in its log file
        (log.warning if info.rank == 0 else log.info)("%s", exc)
        return exc.exit_code
    finally:
        if comm is not None:
            comm.close()
    if cfg.model.path is None and info.rank == 0:  # the embedded demo ends with a before/after summary
        from .demo import print_demo_summary

        print_demo_summary(final, time.time() - t_start)
    return 0


def run(argv: list[str] | None = None) -> None:
    """``main``, then exit. After a requested stop (status 128 + signal) the state is on disk
    and the logs are flushed here: skip the interpreter's teardown (seconds with torch loaded),
    the launcher or scheduler may be counting down to SIGKILL."""
    code = main(argv)
    if code >= 128:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
