"""The adaptive schedule's replay buffer of student samples."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

import torch


class ReplayBuffer:
    """The latest `capacity` sampled `(prompt, completion)` pairs, on the CPU."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._pairs: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._pairs)

    @property
    def is_full(self) -> bool:
        return len(self._pairs) >= self.capacity

    def add(self, prompts: Sequence[torch.Tensor], completions: Sequence[torch.Tensor]) -> None:
        for prompt, completion in zip(prompts, completions, strict=True):
            self._pairs.append((prompt.detach().cpu(), completion.detach().cpu()))

    def sample(
        self, num_sequences: int, rng: random.Random
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`num_sequences` distinct pairs drawn uniformly (`rng` makes it reproducible)."""
        if num_sequences > len(self._pairs):
            raise ValueError(
                f"Cannot replay {num_sequences} sequences from a buffer of {len(self._pairs)}."
            )
        pairs = rng.sample(list(self._pairs), k=num_sequences)
        return [prompt for prompt, _ in pairs], [completion for _, completion in pairs]
