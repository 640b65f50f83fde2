"""Per-layer progress. Rank 0 on a terminal: one tqdm line (layer, phase, elapsed, ETA)
redrawn in place. Otherwise (stderr piped to a file or a launcher, and every other rank):
one plain log line per finished layer, with no carriage returns; other ranks' lines go to
their ``rank{r}.log`` only (their console shows warnings and errors).

The layer loop drives it through ``set_postfix_str("layer {i} {phase}")`` at every phase
change and ``update(1)`` per finished layer (the tqdm interface); phase times shown here
are measured between those calls, the exact ones are in the run report."""
from __future__ import annotations

import logging
import re
import sys
import time

log = logging.getLogger("dist_quant")

_PHASE = re.compile(r"layer (\d+) (\w+)")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class LayerProgress:
    def __init__(self, total: int, rank: int = 0, stream=None, tty: bool | None = None,
                 redraw_interval: float = 0.5):
        self.total, self.rank, self.done = total, rank, 0
        stream = sys.stderr if stream is None else stream
        if tty is None:
            tty = bool(getattr(stream, "isatty", lambda: False)())
        self.start = self._mark = self._drawn = time.perf_counter()
        self._phase: str | None = None
        self._phase_seconds: dict[str, float] = {}
        self._redraw = redraw_interval
        self._bar = None
        if tty and rank == 0:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="quantize", unit="layer", file=stream, dynamic_ncols=True)

    def _switch(self, phase: str | None) -> None:
        now = time.perf_counter()
        if self._phase is not None:
            self._phase_seconds[self._phase] = self._phase_seconds.get(self._phase, 0.0) + now - self._mark
        self._phase, self._mark = phase, now

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        m = _PHASE.fullmatch(text.strip())
        self._switch(m.group(2) if m else text)
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            now = time.perf_counter()
            if refresh or now - self._drawn >= self._redraw:  # show phase changes, at a bounded rate
                self._bar.refresh()
                self._drawn = now

    def update(self, n: int = 1) -> None:
        phase = self._phase
        self._switch(None)
        self.done += n
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        layer_seconds = sum(self._phase_seconds.values())
        shown = {p: s for p, s in self._phase_seconds.items() if s >= 0.05}
        if not shown and self._phase_seconds:  # a fast layer: its longest phase
            p = max(self._phase_seconds, key=self._phase_seconds.get)
            shown = {p: self._phase_seconds[p]}
        phases = ", ".join(f"{p} {s:.1f}" for p, s in shown.items())
        line = (f"layer {self.done}/{self.total} done in {layer_seconds:.1f} s ({phases or phase or '-'}); "
                f"elapsed {_clock(elapsed)}, ETA {_clock(eta)}")
        self._phase_seconds = {}
        if self._bar is not None:
            self._bar.update(n)
            log.debug("%s", line)  # the bar shows it; the log file keeps it
        else:
            log.info("%s", line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
