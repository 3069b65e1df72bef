"""Sampling statistics shared by the PyTorch reference and the torch-free runtime."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BlockStats:
    """What sampling one flow block cost: chunks, Jacobi iterations per chunk, network calls."""

    block: int  # index in forward order (the deep block is the last)
    method: str
    iterations: list[int] = field(default_factory=list)  # per chunk; all 1 for sequential
    evaluations: int = 0  # transformer calls over image tokens (the text prefill not counted)
    tokens: int = 0  # image tokens those calls processed, summed over graph rows ([cond ; uncond])
    seconds: float = 0.0

    @property
    def chunks(self) -> int:
        return len(self.iterations)

    @property
    def mean_iterations(self) -> float:
        return sum(self.iterations) / max(len(self.iterations), 1)
