"""Built-in text for the embedded demo: no download needed.

``data/demo_text.txt`` is a ~300 KB excerpt of WikiText-2 (CC BY-SA 3.0, see
``data/DEMO_TEXT_LICENSE.md``) shipped inside the package. Its first 90 % (~68k
SmolLM2 tokens, enough for 128 x 512) calibrates; its last 10 % (~7.5k tokens) is held
out for the demo's perplexity check. The two never share a line.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from .textdata import split_text

DEMO_TEXT = "demo_text.txt"
CALIBRATION_FRACTION = 0.9


@lru_cache(maxsize=1)
def demo_text() -> str:
    """The whole shipped excerpt."""
    return resources.files(__package__).joinpath("data", DEMO_TEXT).read_text(encoding="utf-8")


def demo_calibration_text() -> str:
    """Calibration text: the first 90 % of the excerpt, in whole lines."""
    return split_text(demo_text(), 0.0, CALIBRATION_FRACTION)


def demo_heldout_text() -> str:
    """Held-out text: the last 10 % of the excerpt, in whole lines (disjoint from the calibration text)."""
    return split_text(demo_text(), CALIBRATION_FRACTION, 1.0)
