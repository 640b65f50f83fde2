"""The in-place factor of GPTQ (dist_quant/algorithms/factor.py) against float64 references."""
import pytest
import torch

from dist_quant.algorithms import factor


@pytest.mark.parametrize("n", [1, 2, 127, 128, 129, 300, 2 * factor.CHUNK + 37])
def test_triangular_inverse_in_place(n):
    g = torch.Generator().manual_seed(n)
    lower = torch.randn(n, n, generator=g, dtype=torch.float64).tril_() * 0.1
    lower.diagonal().copy_(1.0 + torch.rand(n, generator=g, dtype=torch.float64))
    m = lower.float()
    ptr = m.data_ptr()
    factor.tri_inv_lower_(m)
    assert m.data_ptr() == ptr
    ref = torch.linalg.inv(lower)
    assert torch.equal(m, m.tril())  # still lower triangular
    assert (m.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("n", [1, 5, 6, 2 * factor.STRIPE + 3, 2 * factor.STRIPE])
def test_reversals_are_the_half_turn(n):
    a = torch.randn(n, n)
    expected = a.flip((0, 1))
    dst = torch.empty_like(a)
    assert torch.equal(factor.reversed_copy_(dst, a), expected)
    b = a.clone()
    ptr = b.data_ptr()
    assert torch.equal(factor.reverse_(b), expected) and b.data_ptr() == ptr


@pytest.mark.parametrize("n", [3, 200, 700])
def test_inverse_upper_factor_is_the_cholesky_of_the_inverse(n):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    a64 = x.T @ x / (3 * n)
    lam = 0.01 * float(torch.diag(a64).mean())
    a = a64.float()
    before = a.clone()
    work = torch.empty_like(a)
    upper = factor.inverse_upper_factor_(a, work, lam)
    assert torch.equal(a, before)  # left as it was
    assert upper.data_ptr() == work.data_ptr()
    damped = a.double() + lam * torch.eye(n, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert torch.equal(upper, upper.triu())
    assert (upper.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_not_positive_definite_gives_none():
    a = torch.diag(torch.tensor([1.0, -2.0, 3.0]))
    assert factor.inverse_upper_factor_(a, torch.empty_like(a), 0.0) is None
