"""Record the traffic a model serves, as calibration data: ``dist_quant.record``.

    from dist_quant import record

    with record(model, "traffic.safetensors"):
        for batch in my_eval_loop():            # plain forwards, or
            model.generate(**batch, max_new_tokens=256)   # generation, with or without a KV cache

A forward pre-hook on ``model`` sees every call's ``input_ids`` and ``attention_mask``
(in the spirit of the seeds' DataRecorder, which records a layer's real inputs with
hooks). A call that continues a KV cache (a ``past_key_values`` / ``cache`` holding as many positions
as the open batch has recorded) appends its tokens to that batch's rows; a call without
a cache whose ids extend the open batch (generation with ``use_cache=False``) replaces it;
anything else starts a new batch. So a generated sample is its prompt and every generated
token the model processed (the last sampled token never is). Each row keeps the tokens
its attention mask marks real (left padding dropped).

On a clean exit the rows are written (atomically) to a safetensors file with
``input_ids`` [N, L] int64 and ``attention_mask`` [N, L] int8 (right-padded), which
``calib.path=<file>`` reads (format ``safetensors``). Calls without ``input_ids``
(``inputs_embeds`` only) cannot be recorded; they are counted in ``skipped``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("dist_quant")


def _cache_len(past) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and isinstance(past[0], (tuple, list)) and past[0]:
        return int(past[0][0].shape[-2])  # legacy tuple cache: [B, heads, positions, dim]
    return 0


class Recorder:
    def __init__(self) -> None:
        self.samples: list[torch.Tensor] = []  # closed rows, real tokens only
        self.skipped = 0
        self._ids: torch.Tensor | None = None  # open batch [B, T]
        self._mask: torch.Tensor | None = None

    # -- the hook --------------------------------------------------------------------------
    def hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            self.skipped += 1
            return
        ids = ids.detach().to("cpu", torch.long)
        t = ids.shape[1]
        mask = kwargs.get("attention_mask")
        # transformers 4 passes the KV cache as past_key_values, 5 as cache
        past = _cache_len(kwargs.get("past_key_values", kwargs.get("cache")))
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == ids.shape[0]:
            past = past or mask.shape[1] - t  # a generation mask covers past + current positions
            mask = mask.detach().to("cpu")[:, -t:].bool()
        else:
            mask = torch.ones_like(ids, dtype=torch.bool)
        open_ = self._ids
        if open_ is not None and open_.shape[0] == ids.shape[0]:
            if past > 0 and past == open_.shape[1]:  # KV-cache step: continue the open rows
                self._ids = torch.cat([open_, ids], 1)
                self._mask = torch.cat([self._mask, mask], 1)
                return
            if past == 0 and t > open_.shape[1] and torch.equal(ids[:, :open_.shape[1]], open_):
                self._ids, self._mask = ids, mask  # no cache: the whole sequence again, one longer
                return
        self._close()
        self._ids, self._mask = ids, mask

    def _close(self) -> None:
        if self._ids is not None:
            for row, m in zip(self._ids, self._mask):
                if m.any():
                    self.samples.append(row[m].clone())
        self._ids = self._mask = None

    # -- the file --------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        self._close()
        n = len(self.samples)
        length = max((len(s) for s in self.samples), default=0)
        ids = torch.zeros((n, length), dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.int8)
        for i, s in enumerate(self.samples):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def save(self, path: str | os.PathLike[str]) -> Path:
        from safetensors.torch import save_file

        tensors = self.tensors()
        if not self.samples:
            raise ValueError(f"dist_quant.record({str(path)!r}): no forward call with input_ids was recorded "
                             f"({self.skipped} call(s) without input_ids); nothing written")
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp), metadata={"format": "dist_quant.record",
                                               "samples": str(len(self.samples)),
                                               "tokens": str(int(tensors["attention_mask"].sum()))})
        os.replace(tmp, path)
        log.info("dist_quant.record: %d samples, %d tokens -> %s", len(self.samples),
                 int(tensors["attention_mask"].sum()), path)
        return path


@contextlib.contextmanager
def record(model: torch.nn.Module, path: str | os.PathLike[str]):
    """Record what ``model`` processes inside the ``with`` block into ``path`` (written on a
    clean exit only; an exception leaves no file). Yields the :class:`Recorder`."""
    rec = Recorder()
    handle = model.register_forward_pre_hook(rec.hook, with_kwargs=True)
    try:
        yield rec
    finally:
        handle.remove()
    rec.save(path)
