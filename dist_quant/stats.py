"""Calibration statistics kept as sums (never running means) so that a collective
SUM across ranks is exact up to float64 rounding; normalized only after reducing.

Memory of a Hessian (``n = in_features``; one "float32 Hessian" is ``4 n²`` bytes):

* capture, every rank: one float64 accumulator (2 float32 Hessians) that is also the
  buffer the collective reduces in place (no packed copy), plus one row panel of the
  per-batch float32 product (``HESSIAN_ROW_BLOCK`` rows);
* solve, owners only: :meth:`HessianStat.take` converts the reduced sums, in place, into
  the float32 normalized Hessian in the first half of that same storage and hands out the
  second half as the solver's workspace, so the owner never holds more than those
  2 float32 Hessians (plus chunk-sized temporaries).

The per-batch products are float32 GEMMs summed in float64: a float64 sum of float32
products does not round in practice, so the reduced sum does not depend on how the
batches were split over ranks (N ranks = 1 rank). On CUDA, bfloat16 / float16 activations go
into the GEMM as they are with a float32 result (:func:`_gram_panel`: exact products, float32
sums, as after a float32 conversion, at the half-precision rate).

Only the upper triangle is computed (``x xᵀ`` is symmetric): row panel ``[a, b)`` gets
``x[:, a:b]ᵀ x[:, a:]``, about half the GEMM work of the full product (SmolLM2's 1536-wide
down_proj input, 4096 tokens: 62 → 40 ms; the 576-wide ones 9.6 → 6.1 ms on 2 cores). The
lower triangle is mirrored from the upper one when the sums are read (:attr:`HessianStat.sum`,
:meth:`HessianStat.take`), so the Hessian the solver sees is exactly symmetric.
"""
from __future__ import annotations

import torch

HESSIAN_ROW_BLOCK = 192  # rows of the upper triangle of x xᵀ computed per GEMM (bounds the float32 temporary)
TOKEN_CHUNK = 4096  # tokens of a batch converted to float32 at a time
CONVERT_ROWS = 1024  # rows converted per step in take()
ERROR_ROWS = 1024  # weight rows per step in output_error_rows()
DEQUANT_ROWS = 1024  # rows of a quantized linear dequantized into the layer at a time (pipeline)


def _float_panel(xa: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return xa.T @ x


def _gram_panel(xa: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``xaᵀ x`` of bfloat16 / float16 activations as a float32 product on the accelerator's
    half-precision units (``torch.mm(..., out_dtype=float32)``, CUDA only): the products of two
    8- or 11-bit mantissas are exact in float32 and the sums accumulate in float32, the same
    arithmetic as converting to float32 first (only the order of the sums differs), without
    the float32 copy and at the half-precision GEMM rate (about 10x the float32 one on an H200)."""
    return torch.mm(xa.T, x, out_dtype=torch.float32)


_HALF_GEMM = {"ok": None}  # None: not tried yet; False: this torch cannot (fall back for good)


def _half_inputs_ok(x: torch.Tensor) -> bool:
    if x.dtype not in (torch.bfloat16, torch.float16) or x.device.type != "cuda" or _HALF_GEMM["ok"] is False:
        return False
    if _HALF_GEMM["ok"] is None:
        probe = torch.ones(4, 2, dtype=x.dtype, device=x.device)
        try:
            got = _gram_panel(probe, probe)
            _HALF_GEMM["ok"] = got.dtype == torch.float32 and bool((got == 4.0).all())
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without mm's out_dtype
            _HALF_GEMM["ok"] = False
    return bool(_HALF_GEMM["ok"])


class HessianStat:
    """``Σ x xᵀ`` over real tokens (float64) and the token count, in one flat buffer. Between
    :meth:`add` and a read of the sums only the upper triangle is maintained (see the module
    docstring); the flat buffer that ranks SUM-reduce carries the upper triangles."""

    reduce_op = "sum"  # how its packed() buffer combines across ranks (the callers pass it to Comm)

    def __init__(self, features: int, device: torch.device):
        n = features
        self.features = n
        self.flat = torch.zeros(n * n + 1, dtype=torch.float64, device=device)
        self._symmetric = True  # the lower triangle mirrors the upper one

    def _square(self) -> torch.Tensor:
        n = self.features
        return self.flat[: n * n].view(n, n)

    @property
    def sum(self) -> torch.Tensor:
        """``Σ x xᵀ`` [features, features], symmetric (the lower triangle mirrored on read)."""
        if not self._symmetric:
            _mirror_upper_(self._square())
            self._symmetric = True
        return self._square()

    @property
    def count(self) -> torch.Tensor:
        return self.flat[self.features * self.features:]

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """``x`` [..., features] (any float dtype); ``mask`` [...] selects real tokens. The
        batch is taken ``TOKEN_CHUNK`` tokens at a time in float32 (a fixed split of the
        batch, so the sums do not depend on the world size), the upper triangle in row panels
        of ``HESSIAN_ROW_BLOCK`` (float32 GEMM per panel, float64 accumulation)."""
        x = x.reshape(-1, x.shape[-1])
        keep = None if mask is None else mask.reshape(-1)
        s, n = self._square(), self.features
        self._symmetric = False
        for t in range(0, x.shape[0], TOKEN_CHUNK):
            xc = x[t:t + TOKEN_CHUNK]
            if keep is not None:
                kc = keep[t:t + TOKEN_CHUNK]
                if not bool(kc.all()):  # a padded chunk: gather its real tokens (a copy)
                    xc = xc[kc]
            if _half_inputs_ok(xc):
                gram = _gram_panel
            else:
                gram, xc = _float_panel, xc.float()
            for a in range(0, n, HESSIAN_ROW_BLOCK):
                b = min(a + HESSIAN_ROW_BLOCK, n)
                s[a:b, a:].add_(gram(xc[:, a:b], xc[:, a:]))
            self.count.add_(xc.shape[0])

    def packed(self) -> torch.Tensor:
        """The flat buffer itself (sum and count), so one in-place collective carries both."""
        return self.flat

    def unpack(self, flat: torch.Tensor) -> None:
        if flat.data_ptr() != self.flat.data_ptr():
            self.flat = flat
        self._symmetric = False  # the reduced lower triangle is a sum of stale mirrors

    def tokens(self) -> int:
        return int(self.count.item())

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H, workspace)``: the normalized float32 Hessian ``2 Σ x xᵀ / n`` and a float32
        buffer of the same shape, both views of this stat's storage (which is consumed:
        the float64 sums are overwritten). No other Hessian-sized buffer is allocated."""
        n = self.features
        tokens = self.tokens()
        if tokens == 0:
            raise ValueError("no calibration tokens reached this module")
        src = self.sum  # mirrored: symmetric
        dst = self.flat.view(torch.float32)[: 2 * n * n]
        h, work = dst[: n * n].view(n, n), dst[n * n:].view(n, n)
        scale = 2.0 / tokens
        # float32 rows [a, b) live in the bytes of float64 rows [a/2, b/2), all below b, so each
        # block is read out (into a small temporary) before anything it overlaps is written.
        for a in range(0, n, CONVERT_ROWS):
            b = min(a + CONVERT_ROWS, n)
            block = (src[a:b] * scale).to(torch.float32)
            h[a:b].copy_(block)
        self.flat = torch.empty(0, dtype=torch.float64)
        return h, work

    def hessian(self) -> torch.Tensor:
        """The normalized float32 Hessian (consumes the stat; see :meth:`take`)."""
        return self.take()[0]


def _mirror_upper_(s: torch.Tensor) -> None:
    """Lower triangle of the square ``s`` ← its upper triangle, in place, panel by panel
    (temporaries of one ``HESSIAN_ROW_BLOCK``² diagonal block)."""
    n = s.shape[0]
    for a in range(0, n, HESSIAN_ROW_BLOCK):
        b = min(a + HESSIAN_ROW_BLOCK, n)
        d = s[a:b, a:b]
        d.copy_(d.triu() + d.triu(1).T)
        if b < n:
            s[b:, a:b].copy_(s[a:b, b:].T)


def output_error_rows(w: torch.Tensor, w_hat: torch.Tensor | None, h: torch.Tensor
                      ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per row ``r`` of ``w`` [out, in]: ``(ΔW H ΔWᵀ)_rr`` and ``(W H Wᵀ)_rr`` (float64),
    computed in row blocks (float32 GEMMs) so that no ``[out, in]`` float64 copy exists.
    Summed over a module's rows, their ratio is its relative output error. ``w_hat=None``:
    the second only (one GEMM; the first is then None)."""
    num = None if w_hat is None else torch.empty(w.shape[0], dtype=torch.float64, device=w.device)
    den = torch.empty(w.shape[0], dtype=torch.float64, device=w.device)
    hf = h.float()
    for a in range(0, w.shape[0], ERROR_ROWS):
        b = min(a + ERROR_ROWS, w.shape[0])
        wb = w[a:b].float()
        if num is not None:
            d = wb - w_hat[a:b].float()
            num[a:b] = ((d @ hf) * d).sum(dim=1, dtype=torch.float64)
        den[a:b] = ((wb @ hf) * wb).sum(dim=1, dtype=torch.float64)
    return num, den


def error_ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float(num)


def relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖²`` on the calibration inputs, from the Hessian alone."""
    num, den = output_error_rows(w, w_hat, h)
    return error_ratio(num.sum(), den.sum())


class ChannelRangeStat:
    """Per-channel minimum and maximum over real tokens. Reduced with one MAX over
    ``[-min, max]`` (exact: no rounding), so every rank can hold the global range."""

    reduce_op = "max"

    def __init__(self, features: int, device: torch.device):
        self.neg_min = torch.full((features,), float("-inf"), device=device)
        self.max = torch.full((features,), float("-inf"), device=device)

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]) if mask is None else x[mask]
        if x.shape[0] == 0:
            return
        x = x.float()
        self.neg_min = torch.maximum(self.neg_min, -x.amin(dim=0))
        self.max = torch.maximum(self.max, x.amax(dim=0))

    def packed(self) -> torch.Tensor:
        return torch.cat([self.neg_min, self.max])

    def unpack(self, flat: torch.Tensor) -> None:
        n = self.max.shape[0]
        self.neg_min, self.max = flat[:n].clone(), flat[n:].clone()

    @property
    def min(self) -> torch.Tensor:
        return -self.neg_min

    def absmax(self) -> torch.Tensor:
        """``max |x_j|`` per channel (0 for a channel no token reached)."""
        return torch.maximum(self.neg_min, self.max).clamp(min=0)


def quantized_output_error(w: torch.Tensor, result, args, h: torch.Tensor) -> tuple[float, float]:
    """``(tr(ΔW H ΔWᵀ), tr(W H Wᵀ))`` of a quantized linear (``result``: a ``QuantResult``),
    dequantized block by block so that no float copy of the whole weight is made. When the
    solver measured ``ΔW H ΔWᵀ`` itself (``result.err_rows``, GPTQ) only ``W H Wᵀ`` is computed
    (or taken from ``result.den_rows`` when the solver computed it meanwhile)."""
    if result.err_rows is not None:
        den = result.den_rows if result.den_rows is not None else output_error_rows(w, None, h)[1]
        return float(result.err_rows.sum()), float(den.sum())
    num = den = 0.0
    for a in range(0, w.shape[0], ERROR_ROWS):
        b = min(a + ERROR_ROWS, w.shape[0])
        part = type(result)(result.q[a:b], result.scale[a:b], result.zero[a:b])
        n, d = output_error_rows(w[a:b], part.dequantize(args), h)
        num += float(n.sum())
        den += float(d.sum())
    return num, den
