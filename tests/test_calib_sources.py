"""Calibration sources (dist_quant/calib_sources/): chat records, datasets on disk,
pre-tokenized ids, recorded traffic. Every case is checked against the tokenizer's (or
transformers') own output computed here, not against dist_quant's."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_quant.calib_sources import detect_format, load_calibration, load_smooth_calibration  # noqa: E402
from dist_quant.calibration import CalibrationError  # noqa: E402
from dist_quant.config import CalibConfig, ConfigError  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}")
OTHER_TEMPLATE = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a cat?"},
     {"role": "assistant", "content": "A small feline mammal."}],
    [{"role": "user", "content": "Say the alphabet backwards, " * 30}],
    [{"role": "developer", "content": "Use tools."}, {"role": "user", "content": "weather?"},
     {"role": "assistant", "content": "calling"}, {"role": "tool", "content": "rain, 12 C"}],
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny BPE tokenizer with a chat template, saved and reloaded (the template comes
    from the files, as a checkpoint's does)."""
    from transformers import AutoTokenizer

    from tiny import make_tokenizer

    d = tmp_path_factory.mktemp("tok")
    tok = make_tokenizer(d)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    return AutoTokenizer.from_pretrained(str(d))


def no_tokenizer():
    raise AssertionError("the tokenizer was loaded for a pre-tokenized format")


def cfg(path, **kw) -> CalibConfig:
    return CalibConfig(path=str(path), **kw)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_ids(tokenizer, messages, template=None) -> list[int]:
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def assert_rows(calib, expected: list[list[int]], seq_len: int, pad: int) -> None:
    assert calib.input_ids.shape == (len(expected), seq_len)
    for i, ref in enumerate(expected):
        n = min(len(ref), seq_len)
        assert calib.input_ids[i, :n].tolist() == ref[:n], f"sample {i}"
        assert calib.input_ids[i, n:].tolist() == [pad] * (seq_len - n)
        assert calib.mask[i].tolist() == [True] * n + [False] * (seq_len - n)


# -- chat records ------------------------------------------------------------------------------
def test_chat_uses_the_tokenizers_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m, "id": i} for i, m in enumerate(CONVERSATIONS)])
    assert detect_format(path) == "chat"
    calib = load_calibration(cfg(path, num_samples=3, seq_len=120), tokenizer)
    expected = [chat_ids(tokenizer, m) for m in CONVERSATIONS]
    assert len(expected[1]) > 120 > len(expected[0])  # one truncated, one padded
    assert_rows(calib, expected, 120, tokenizer.pad_token_id)
    # the template's markers are in the ids: the rendering really happened
    assert tokenizer.decode(calib.input_ids[0, : calib.mask[0].sum()]).startswith("<|system|>You are terse.")


def test_chat_template_override_string_and_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    expected = [chat_ids(tokenizer, m, OTHER_TEMPLATE) for m in CONVERSATIONS[:2]]
    assert expected != [chat_ids(tokenizer, m) for m in CONVERSATIONS[:2]]
    calib = load_calibration(cfg(path, num_samples=2, seq_len=64, chat_template=OTHER_TEMPLATE), tokenizer)
    assert_rows(calib, expected, 64, tokenizer.pad_token_id)
    tfile = tmp_path / "t.jinja"
    tfile.write_text(OTHER_TEMPLATE)
    again = load_calibration(cfg(path, num_samples=2, seq_len=64, chat_template=str(tfile)), tokenizer)
    assert torch.equal(again.input_ids, calib.input_ids)


@pytest.mark.parametrize("record,needle", [
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user"}]}, "no string 'content'"),
    ({"messages": []}, "non-empty list"),
    ({"text": "hello"}, "no a 'messages' list"),
])
def test_chat_bad_record_is_one_line_naming_line(tmp_path, tokenizer, record, needle):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}, record])
    with pytest.raises(CalibrationError) as err:
        load_calibration(cfg(path, num_samples=2, seq_len=16, format="chat"), tokenizer)
    msg = str(err.value)
    assert needle in msg and "line 2" in msg and str(path) in msg and "\n" not in msg


def test_chat_without_any_template_is_refused(tmp_path):
    from tiny import make_tokenizer

    tok = make_tokenizer(tmp_path / "tok")  # no chat template
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(CalibrationError, match="calib.chat_template"):
        load_calibration(cfg(path, num_samples=1, seq_len=16), tok)


# -- pre-tokenized ids -------------------------------------------------------------------------
def test_ids_jsonl_masks_and_never_loads_a_tokenizer(tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8]},
            {"input_ids": [0, 0, 9, 10, 11], "attention_mask": [0, 0, 1, 1, 1]},  # left padded
            {"input_ids": []},  # skipped: no tokens
            {"input_ids": list(range(1, 30))}]
    path = write_jsonl(tmp_path / "ids.jsonl", rows)
    assert detect_format(path) == "ids"
    calib = load_calibration(cfg(path, num_samples=3, seq_len=12), tokenizer_factory=no_tokenizer,
                             vocab_size=100)
    assert_rows(calib, [[5, 6, 7, 8], [9, 10, 11], list(range(1, 13))], 12, 0)


@pytest.mark.parametrize("row,needle", [
    ({"input_ids": [1, 2, 500]}, "token id 500 >= the model's vocab_size=100"),
    ({"input_ids": [1, -2]}, "token id -2 is negative"),
    ({"input_ids": [1, "a"]}, "token id 'a' is not an integer"),
    ({"input_ids": [1, 2], "attention_mask": [1]}, "'attention_mask' must be a list of 0/1 as long"),
    ({"ids": [1, 2]}, "no an 'input_ids' list"),
])
def test_ids_bad_rows(tmp_path, row, needle):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1]}, row])
    with pytest.raises(CalibrationError) as err:
        load_calibration(cfg(path, num_samples=2, seq_len=4, format="ids"), tokenizer_factory=no_tokenizer,
                         vocab_size=100)
    assert needle in str(err.value) and "line 2" in str(err.value)


def test_safetensors_ids_with_mask(tmp_path):
    ids = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0], [9, 1, 2, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.int8)
    path = tmp_path / "ids.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask}, str(path))
    assert detect_format(path) == "safetensors"
    calib = load_calibration(cfg(path, num_samples=3, seq_len=3), tokenizer_factory=no_tokenizer)
    assert_rows(calib, [[3, 4], [5, 6, 7], [9, 1, 2]], 3, 0)
    save_file({"input_ids": ids.to(torch.int32)}, str(path))  # no mask: every token is real
    calib = load_calibration(cfg(path, num_samples=4, seq_len=4), tokenizer_factory=no_tokenizer)
    assert torch.equal(calib.input_ids, ids) and bool(calib.mask.all())


@pytest.mark.parametrize("kind", ["text", "no_ids", "float", "1d", "mask_shape"])
def test_safetensors_wrong_kind(tmp_path, kind):
    path = tmp_path / "c.safetensors"
    if kind == "text":
        path.write_text("hello, this is not a safetensors file at all")
    else:
        t = {"no_ids": {"tokens": torch.zeros(2, 3, dtype=torch.long)},
             "float": {"input_ids": torch.zeros(2, 3)},
             "1d": {"input_ids": torch.zeros(3, dtype=torch.long)},
             "mask_shape": {"input_ids": torch.zeros(2, 3, dtype=torch.long),
                            "attention_mask": torch.ones(2, 2, dtype=torch.long)}}[kind]
        save_file(t, str(path))
    needle = {"text": "not a safetensors file", "no_ids": "no 'input_ids' tensor (tensors: tokens)",
              "float": "2-D integer tensor", "1d": "2-D integer tensor", "mask_shape": "has shape [2, 2]"}[kind]
    with pytest.raises(CalibrationError) as err:
        load_calibration(cfg(path, num_samples=1, seq_len=4), tokenizer_factory=no_tokenizer)
    assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_too_few_pretokenized_samples(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2]}, {"input_ids": []}])
    with pytest.raises(CalibrationError, match="has 1 non-empty samples, fewer than calib.num_samples=3"):
        load_calibration(cfg(path, num_samples=3, seq_len=4), tokenizer_factory=no_tokenizer)


# -- recorded traffic ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1,
                         eos_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("use_cache", [True, False])
def test_record_generation_and_forwards_then_calibrate_on_them(tmp_path, tiny_lm, use_cache):
    from dist_quant import record

    prompts = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    evals = torch.tensor([[11, 12, 13, 14, 15, 16]])
    path = tmp_path / "traffic.safetensors"
    with torch.no_grad(), record(tiny_lm, path) as rec:
        out = tiny_lm.generate(input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=4,
                               do_sample=False, use_cache=use_cache, pad_token_id=0)
        tiny_lm(evals)  # an evaluation-loop forward
        tiny_lm(input_ids=evals[:, :3], attention_mask=torch.tensor([[1, 1, 0]]))
    # the model processed each prompt's real tokens and every generated token but the last
    expected = [[int(t) for t, m in zip(out[b, :5], prompt_mask[b]) if m] + out[b, 5:-1].tolist() for b in range(2)]
    expected += [evals[0].tolist(), [11, 12]]
    assert [s.tolist() for s in rec.samples] == expected
    calib = load_calibration(cfg(path, num_samples=4, seq_len=8), tokenizer_factory=no_tokenizer, vocab_size=97)
    assert_rows(calib, expected, 8, 0)


def test_record_writes_nothing_on_error(tmp_path, tiny_lm):
    from dist_quant import record

    path = tmp_path / "traffic.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with record(tiny_lm, path):
            tiny_lm(torch.tensor([[1, 2, 3]]))
            raise RuntimeError("boom")
    assert not path.exists() and list(tmp_path.iterdir()) == []


# -- Hugging Face datasets on disk ---------------------------------------------------------------
TEXTS = [f"record {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 4) for i in range(23)]
TEXTS[4] = "   "  # skipped: blank


def reference_draw(tokenizer, texts, num_samples, seed) -> list[list[int]]:
    """The documented draw: order torch.randperm(len, manual_seed(seed)), first non-empty."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [texts[i] for i in order if texts[i].strip()][:num_samples]
    return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in chosen]


@pytest.fixture(scope="module")
def datasets_mod():
    return pytest.importorskip("datasets", reason="the 'datasets' package is not installed")


@pytest.mark.parametrize("layout", ["save_to_disk", "dataset_dict", "parquet", "parquet_dir", "arrow"])
def test_dataset_on_disk_seeded_draw(tmp_path, tokenizer, datasets_mod, layout):
    ds = datasets_mod.Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))})
    path = tmp_path / "ds"
    if layout == "save_to_disk":
        ds.save_to_disk(str(path))
    elif layout == "dataset_dict":
        datasets_mod.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    elif layout in ("parquet", "parquet_dir"):
        path.mkdir()
        if layout == "parquet":
            ds.to_parquet(str(path / "d.parquet"))
            path = path / "d.parquet"
        else:
            ds.select(range(10)).to_parquet(str(path / "a.parquet"))
            ds.select(range(10, len(TEXTS))).to_parquet(str(path / "b.parquet"))
    else:
        ds.save_to_disk(str(path))
        path = next(path.glob("*.arrow"))
    assert detect_format(path) == "dataset"
    for seed in (0, 5):
        calib = load_calibration(cfg(path, num_samples=6, seq_len=20, text_field="body"), tokenizer, seed=seed)
        assert_rows(calib, reference_draw(tokenizer, TEXTS, 6, seed), 20, tokenizer.pad_token_id)
    assert reference_draw(tokenizer, TEXTS, 6, 0) != reference_draw(tokenizer, TEXTS, 6, 5)


def test_dataset_chat_column(tmp_path, tokenizer, datasets_mod):
    datasets_mod.Dataset.from_dict({"messages": CONVERSATIONS}).save_to_disk(str(tmp_path / "ds"))
    calib = load_calibration(cfg(tmp_path / "ds", num_samples=3, seq_len=64, text_field="messages"),
                             tokenizer, seed=1)
    order = torch.randperm(3, generator=torch.Generator().manual_seed(1)).tolist()
    assert_rows(calib, [chat_ids(tokenizer, CONVERSATIONS[i]) for i in order], 64, tokenizer.pad_token_id)


@pytest.mark.parametrize("case,needle", [
    ("empty", "the dataset is empty (0 records)"),
    ("empty_parquet", "the dataset is empty (0 records)"),
    ("column", "has no column 'text' (calib.text_field; columns: body, n)"),
    ("kind", "calib.format=dataset expects a save_to_disk folder"),
    ("folder", "neither a save_to_disk dataset"),
    ("corrupt", "cannot be read as a dataset"),
    ("few", "has 22 non-empty samples, fewer than calib.num_samples=40"),
])
def test_dataset_bad_input(tmp_path, tokenizer, datasets_mod, case, needle):
    path = tmp_path / "ds"
    kw = {"text_field": "body"}
    if case == "empty":
        datasets_mod.Dataset.from_dict({"body": []}).save_to_disk(str(path))
    elif case == "empty_parquet":
        path = tmp_path / "e.parquet"
        datasets_mod.Dataset.from_dict({"body": ["x"]}).select([]).to_parquet(str(path))
    elif case in ("column", "few"):
        datasets_mod.Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))}).save_to_disk(str(path))
        kw = {} if case == "column" else kw
    elif case == "kind":
        path = tmp_path / "a.txt"
        path.write_text("text")
    elif case == "folder":
        path.mkdir()
        (path / "x.txt").write_text("x")
    else:
        path = tmp_path / "bad.parquet"
        path.write_text("not parquet")
    with pytest.raises(CalibrationError) as err:
        load_calibration(cfg(path, num_samples=40 if case == "few" else 2, seq_len=8, format="dataset", **kw),
                         tokenizer)
    assert needle in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_dataset_without_the_datasets_package_says_so(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    with pytest.raises(CalibrationError, match=r"needs the 'datasets' package \(pip install datasets\)"):
        load_calibration(cfg(tmp_path / "ds", num_samples=1, seq_len=8), tokenizer)


# -- config, smoothing set -----------------------------------------------------------------------
def test_unknown_format_is_a_config_error():
    with pytest.raises(ConfigError, match="calib.format='csv': expected auto or one of text, jsonl, chat"):
        CalibConfig(format="csv")


def test_smooth_set_read_like_the_calibration_set(tmp_path, tokenizer):
    main = write_jsonl(tmp_path / "main.jsonl", [{"input_ids": [1, 2, 3]}] * 4)
    smooth = write_jsonl(tmp_path / "smooth.jsonl", [{"messages": m} for m in CONVERSATIONS])
    c = CalibConfig(path=str(main), smooth_path=str(smooth), num_samples=4, smooth_num_samples=2, seq_len=32)
    assert load_smooth_calibration(CalibConfig(path=str(main)), tokenizer) is None
    s = load_smooth_calibration(c, tokenizer)
    assert_rows(s, [chat_ids(tokenizer, m) for m in CONVERSATIONS[:2]], 32, tokenizer.pad_token_id)
    with pytest.raises(CalibrationError, match="calib.smooth_path="):
        load_smooth_calibration(CalibConfig(smooth_path=str(tmp_path / "none.jsonl")), tokenizer)
