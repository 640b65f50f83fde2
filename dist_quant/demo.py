"""The end of ``python -m dist_quant`` without a model: a short before/after summary of
the embedded demo (time, size, perplexity of the float and the quantized checkpoint on
the built-in held-out text, with :func:`dist_quant.eval.perplexity`)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("dist_quant")

EVAL_SEQ_LEN = 512
EVAL_WINDOWS = 8  # 8 x 512 held-out tokens: a few seconds per model on a laptop CPU
EVAL_BATCH = 4


def demo_checkpoint_or_error() -> tuple[str | None, str | None]:
    """``(path, None)`` of the demo checkpoint (converted on first use, see
    :func:`dist_quant.demo_model.ensure_demo_checkpoint`), or ``(None, message)`` saying why
    it is unavailable: ``python -m dist_quant`` without ``model.path`` then fails in one line."""
    from .demo_model import ensure_demo_checkpoint

    try:
        return str(ensure_demo_checkpoint()), None
    except (RuntimeError, OSError) as e:
        return None, f"model.path is not set and the embedded demo model is unavailable: {' '.join(str(e).split())}"


def checkpoint_bytes(directory: Path) -> int:
    """Bytes of the safetensors weight files of a checkpoint directory."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def heldout_perplexity(model_dir: Path, text: str, seq_len: int = EVAL_SEQ_LEN,
                       windows: int = EVAL_WINDOWS) -> dict:
    """Perplexity of a float or compressed-tensors checkpoint on ``text`` (CPU, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .eval import perplexity

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return perplexity(model, ids, seq_len=seq_len, max_windows=windows, batch_size=EVAL_BATCH)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def demo_summary(final: Path, seconds: float) -> list[str]:
    """The summary lines (runs the two perplexity evaluations)."""
    from .demo_data import demo_heldout_text

    final = Path(final)
    report = json.loads((final / "quant_report.json").read_text())
    source = Path(report["model"])
    q, c = report["config"]["quant"], report["config"]["calib"]
    before, after = checkpoint_bytes(source), checkpoint_bytes(final)
    lines = [
        f"demo summary: {source.name}, {q['name']} (group size {q['group_size']}), "
        f"calibration {c['num_samples']} x {c['seq_len']} tokens, world size {report['world_size']}",
        f"  time        {seconds:.1f} s in all, {report['wall_seconds']:.1f} s quantizing",
        f"  size        {_mb(before)} -> {_mb(after)} ({after / before:.2f}x)" if before else
        f"  size        {_mb(after)}",
    ]
    t0 = time.perf_counter()
    try:
        text = demo_heldout_text()
        fp = heldout_perplexity(source, text)
        qp = heldout_perplexity(final, text)
        lines.append(f"  perplexity  {fp['ppl']:.2f} -> {qp['ppl']:.2f} ({100 * (qp['ppl'] / fp['ppl'] - 1):+.1f} %) "
                     f"on {qp['windows']} x {EVAL_SEQ_LEN} held-out tokens of the built-in text "
                     f"({time.perf_counter() - t0:.0f} s)")
    except Exception as exc:  # the checkpoint is written; a failed check is reported, not fatal
        log.warning("demo: perplexity check failed: %s", exc)
        lines.append(f"  perplexity  not measured ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
    lines.append(f"  output      {final}  (python -m dist_quant.eval model.path={final} data.path=FILE)")
    return lines


def print_demo_summary(final: Path, seconds: float) -> None:
    for line in demo_summary(final, seconds):
        print(line, flush=True)
