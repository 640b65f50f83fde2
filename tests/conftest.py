"""Shared fixtures. ``tests/`` is on ``sys.path`` (pytest's rootdir-relative import), so test
modules import ``helpers`` (running the tool), ``reference`` (independent reference code),
``tiny`` / ``tiny_moe`` (tiny random checkpoints) directly."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import WIKI, make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's tests (the solvers' bits are compared on one thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def calib_file() -> Path:
    """The calibration text every dense test uses: the package's own WikiText-2 excerpt."""
    return WIKI


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(**kwargs)``: a tiny random checkpoint (tests/tiny.py), built once per session
    for each distinct set of arguments. Treat it as read-only."""
    built: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in built:
            built[key] = make_tiny_model(tmp_path_factory.mktemp("tiny_model"), **kwargs)
        return built[key]

    return make
