"""Calibration statistics kept as sums (never running means) so that a collective
SUM across ranks is exact up to float64 rounding; normalized only after reducing."""
from __future__ import annotations

import torch


class HessianStat:
    """``Σ x xᵀ`` over real tokens (float64) and the token count."""

    reduce_op = "sum"  # how its packed() buffer combines across ranks (the callers pass it to Comm)

    def __init__(self, features: int, device: torch.device):
        self.sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.count = torch.zeros(1, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """``x`` [..., features]; ``mask`` [...] selects real tokens."""
        x = x.reshape(-1, x.shape[-1]) if mask is None else x[mask]
        x = x.float()
        self.sum += (x.T @ x).double()  # float32 GEMM per batch, float64 accumulation
        self.count += x.shape[0]

    def packed(self) -> torch.Tensor:
        """One flat buffer, so one collective carries sum and count."""
        return torch.cat([self.sum.reshape(-1), self.count])

    def unpack(self, flat: torch.Tensor) -> None:
        n = self.sum.shape[0]
        self.sum = flat[: n * n].reshape(n, n)
        self.count = flat[n * n:]

    def hessian(self) -> torch.Tensor:
        """The normalized GPTQ Hessian ``2 Σ x xᵀ / n``."""
        n = float(self.count.item())
        if n == 0:
            raise ValueError("no calibration tokens reached this module")
        return self.sum * (2.0 / n)


def relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖²`` on the calibration inputs, from the Hessian alone."""
    w64, d = w.double(), (w - w_hat).double()
    num = ((d @ h) * d).sum()
    den = ((w64 @ h) * w64).sum()
    return float(num / den) if den > 0 else float(num)


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
