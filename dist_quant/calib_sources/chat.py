"""Chat records: ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the
model's own chat template (``tokenizer.apply_chat_template``; the template is data, no
checkpoint code runs) or ``calib.chat_template``, then tokenized without adding special
tokens (the template writes them), exactly as ``apply_chat_template(tokenize=True)`` does."""
from __future__ import annotations

from pathlib import Path

from ..calibration import CalibrationSet
from .base import Context, pack, register
from .text import jsonl_records

ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGES = "messages"


def chat_template(ctx: Context) -> str | None:
    """``calib.chat_template``: a Jinja template, or the path of a file holding one; None: the
    tokenizer's own."""
    value = ctx.cfg.chat_template
    if value is None:
        if not getattr(ctx.tokenizer, "chat_template", None):
            raise ctx.error("chat records need a chat template and the tokenizer has none "
                            "(set calib.chat_template to a Jinja template or a .jinja file)")
        return None
    if "{" not in value:  # no Jinja syntax: a file name
        path = Path(value)
        if not path.is_file():
            raise ctx.error(f"calib.chat_template={value!r} is neither a Jinja template nor a file")
        return path.read_text(encoding="utf-8")
    return value


def check_messages(ctx: Context, messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ctx.error(f"{where}: {MESSAGES!r} must be a non-empty list of {{role, content}} messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ctx.error(f"{where}: message {j} is not an object")
        if m.get("role") not in ROLES:
            raise ctx.error(f"{where}: message {j} has unknown role {m.get('role')!r} "
                            f"(expected one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise ctx.error(f"{where}: message {j} ({m['role']}) has no string 'content'")
    return messages


def render_ids(ctx: Context, messages: list[dict], template: str | None) -> list[int]:
    tok = ctx.tokenizer
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def tokenize_conversations(ctx: Context, conversations) -> CalibrationSet:
    """``conversations``: (where, messages) pairs, read lazily; stops at ``num_samples``."""
    template = chat_template(ctx)
    samples = []
    for where, messages in conversations:
        samples.append(render_ids(ctx, check_messages(ctx, messages, where), template))
        if len(samples) == ctx.num_samples:
            break
    return pack(ctx, samples, "conversations")


@register("chat", needs_tokenizer=True, doc="JSONL chat records, a 'messages' list of {role, content} "
          "per line, rendered with the tokenizer's chat template or calib.chat_template")
def read_chat(ctx: Context) -> CalibrationSet:
    want = f"a {MESSAGES!r} list"
    convs = ((f"line {n}", r[MESSAGES]) if MESSAGES in r else _missing(ctx, n, want)
             for n, r in jsonl_records(ctx, want))
    return tokenize_conversations(ctx, convs)


def _missing(ctx: Context, lineno: int, want: str):
    raise ctx.error(f"line {lineno}: no {want}")
