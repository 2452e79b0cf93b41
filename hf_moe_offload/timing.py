"""The step clock of `generate`, shared by the command line and the benchmarks: a logits processor that timestamps
every decoding step, and the split of a run into prefill (up to the first logits) and the generation phase (the
forwards after it), as every tokens/s figure of this project counts them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor


class StepClock(LogitsProcessor):
    """Timestamps every decoding step; `on_first_step` runs at the first one (the end of the prefill), e.g. to reset
    the offload counters so that they cover the generation phase only.

    Args:
        on_first_step: called once, at the first step.
    """

    def __init__(self, on_first_step: Callable[[], object] | None = None):
        self.started = time.perf_counter()
        self.times: list[float] = []
        self.on_first_step = on_first_step

    def start(self) -> None:
        """Restart the clock (call right before `generate`)."""
        self.started = time.perf_counter()
        self.times = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        if len(self.times) == 1 and self.on_first_step is not None:
            self.on_first_step()
        return scores

    def phase(self, batch: int) -> Phase:
        """The timings of the run that just ended, for `batch` sequences."""
        steps = len(self.times) - 1
        seconds = self.times[-1] - self.times[0] if self.times else 0.0
        return Phase(
            prefill_seconds=(self.times[0] if self.times else time.perf_counter()) - self.started,
            generation_seconds=seconds,
            steps=max(steps, 0),
            tokens=batch * max(steps, 0),
        )


@dataclass
class Phase:
    """Prefill = up to the first logits; the generation phase = the forwards after it."""

    prefill_seconds: float
    generation_seconds: float
    steps: int
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.generation_seconds if self.generation_seconds > 0 else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {
            "prefill_seconds": self.prefill_seconds,
            "generation_seconds": self.generation_seconds,
            "steps": self.steps,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
        }
