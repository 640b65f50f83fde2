"""Calibration sources through whole runs: pre-tokenized ids on a checkpoint with no
tokenizer give the run on the same text; chat records on 2 ranks give 1 rank's output
bit-identically (calib.smooth_path runs: tests/test_smooth_lane.py)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_quant.fakequant import read_tensors  # noqa: E402
from helpers import call_main, free_port, job_env  # noqa: E402

CALIB = ["calib.num_samples=8", "calib.seq_len=32", "calib.batch_size=2", "runtime.threads=1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    from tiny import corpus_text, make_tiny_model

    base = tmp_path_factory.mktemp("calib_runs")
    model = make_tiny_model(base / "llama", arch="llama", layers=2)
    tok = AutoTokenizer.from_pretrained(str(model))
    text = corpus_text(120_000)
    lines = [ln for ln in text.split("\n") if len(ln.strip()) > 40]
    texts = lines[:8]
    (base / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    (base / "ids.jsonl").write_text("".join(json.dumps({"input_ids": i}) + "\n" for i in ids))
    g = torch.Generator().manual_seed(1)  # traffic unlike the calibration text
    smooth_ids = [torch.randint(0, len(tok), (20 + 3 * i,), generator=g).tolist() for i in range(8)]
    (base / "smooth.jsonl").write_text("".join(json.dumps({"input_ids": i}) + "\n" for i in smooth_ids))
    chats = [[{"role": "user", "content": t[: len(t) // 2]}, {"role": "assistant", "content": t[len(t) // 2:]}]
             for t in texts]
    (base / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    bare = Path(shutil.copytree(model, base / "no_tokenizer"))
    for f in bare.iterdir():
        if "token" in f.name or f.suffix in (".jinja", ".txt") or f.name in ("vocab.json", "merges.txt"):
            f.unlink()
    return {"base": base, "model": model, "bare": bare, "smooth_ids": smooth_ids}


def quantize(setup, name: str, model: str, calib: str, *extra: str) -> Path:
    out = setup["base"] / "out" / name
    if not out.exists():
        argv = [f"model.path={setup[model]}", f"calib.path={setup['base'] / calib}", *CALIB,
                f"output.dir={out}", f"runtime.run_dir={out}.run", *extra]
        assert call_main(argv) == 0
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = read_tensors(a, "model.safetensors.index.json"), read_tensors(b, "model.safetensors.index.json")
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def test_pretokenized_ids_without_a_tokenizer_equal_the_text_run(setup):
    from transformers import AutoTokenizer

    with pytest.raises(Exception):
        AutoTokenizer.from_pretrained(str(setup["bare"]))  # really no tokenizer there
    text = quantize(setup, "text", "model", "text.jsonl", "quant.group_size=32")
    ids = quantize(setup, "ids", "bare", "ids.jsonl", "quant.group_size=32")
    assert_same_tensors(text, ids)


def test_tokenizerless_checkpoint_with_text_calibration_is_one_line(setup, capsys):
    out = setup["base"] / "out" / "refused"
    rc = call_main([f"model.path={setup['bare']}", f"calib.path={setup['base'] / 'text.jsonl'}", *CALIB,
                    "quant.group_size=32", f"output.dir={out}", f"runtime.run_dir={out}.run"])
    err = capsys.readouterr().err
    assert rc == 2 and "no tokenizer that loads without remote code" in err and "calib.format=ids" in err
    assert not out.exists()


CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"


def test_two_ranks_on_chat_records_give_one_ranks_output(setup):
    """Chat records tokenized on each rank (template file override): 2 ranks = 1 rank, bit for bit."""
    import subprocess

    (setup["base"] / "chat.jinja").write_text(CHAT_TEMPLATE)  # a Jinja literal does not survive Hydra's parser
    extra = ["quant=flexsmooth_w8a8", "quant.weight_solver=gptq", "quant.search_tokens=64",
             f"calib.chat_template={setup['base'] / 'chat.jinja'}"]
    one = quantize(setup, "chat-1", "model", "chat.jsonl", *extra)
    out = setup["base"] / "out" / "chat-2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "dist_quant", f"model.path={setup['model']}", f"calib.path={setup['base'] / 'chat.jsonl'}",
           *CALIB, f"output.dir={out}", f"runtime.run_dir={out}.run", *extra]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600, env=job_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "quant_report.json").read_text())["world_size"] == 2
    assert_same_tensors(one, out)


def test_smooth_path_without_smoothing_is_refused(setup, capsys):
    out = setup["base"] / "out" / "nosmooth"
    rc = call_main([f"model.path={setup['model']}", f"calib.path={setup['base'] / 'text.jsonl'}", *CALIB,
                    f"calib.smooth_path={setup['base'] / 'smooth.jsonl'}", f"output.dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2 and "calib.smooth_path=" in err and "quant.smooth=none" in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error")]) == 1
