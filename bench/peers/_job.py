"""The job both peer scripts run, defined once: the calibration rows dist_quant takes
(the token stream from the start of the file, cut into SAMPLES rows of SEQ tokens)."""
import torch

SAMPLES, SEQ, WINDOWS = 128, 512, 40  # rows, tokens per row, held-out windows


def calibration_rows(tok, data: str) -> torch.Tensor:
    text = open(data, encoding="utf-8", errors="replace").read()
    ids = tok(text[: SAMPLES * SEQ * 6], add_special_tokens=False)["input_ids"][: SAMPLES * SEQ]
    if len(ids) != SAMPLES * SEQ:
        raise SystemExit(f"{data} has {len(ids)} tokens, fewer than {SAMPLES} x {SEQ}")
    return torch.tensor(ids).view(SAMPLES, SEQ)
