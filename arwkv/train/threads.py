"""Choose torch's CPU thread count by timing training steps, and time them again now and then.

On a CPU, more threads are not always faster: a small model's ops are too short to split, and when another
process keeps a core busy every op that waits for its descheduled thread stalls (with 2 threads and one busy
core a stories260K distillation ran 3.4x slower than idle, while one thread lost nothing). The fastest count
depends on the model and on what else runs, and the latter changes during a run, so `ThreadTuner` runs a few
steps at each candidate count, keeps the fastest, and measures again every `every` steps.

Results then depend on the thread counts chosen (a reduction split over 2 threads rounds differently from one
on 1): a run that must be reproducible bit for bit sets a fixed count instead (recipe key `threads`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ThreadTuner:
    """Call `before_step()` before and `after_step(seconds, tokens)` after every training step."""

    def __init__(
        self, candidates: Sequence[int] | None = None, probe_steps: int = 2, every: int = 100
    ) -> None:
        self.initial = torch.get_num_threads()
        self.candidates = sorted(set(candidates or (1, self.initial)))
        self.probe_steps, self.every = max(1, probe_steps), max(1, every)
        self.current = self.initial
        self.rates: dict[int, float] = {}  # best tokens/s of each candidate in the latest probe
        self._plan: list[int] = []
        self._since = 0
        self._probe()

    def _probe(self) -> None:
        self._plan = [c for c in self.candidates for _ in range(self.probe_steps)]
        self.rates = {}

    def before_step(self) -> int:
        """Set the thread count of the coming step; returns it."""
        if self._plan:
            self.current = self._plan[0]
        torch.set_num_threads(self.current)
        return self.current

    def after_step(self, seconds: float, tokens: int) -> None:
        if not self._plan:
            self._since += 1
            if self._since >= self.every:
                self._probe()
            return
        count = self._plan.pop(0)
        # best of the probe steps: the first step after a switch (or of the run) pays warm-up costs
        self.rates[count] = max(self.rates.get(count, 0.0), tokens / max(seconds, 1e-9))
        if not self._plan:
            self.current = max(self.candidates, key=lambda c: self.rates.get(c, 0.0))
            self._since = 0

    def restore(self) -> None:
        torch.set_num_threads(self.initial)
