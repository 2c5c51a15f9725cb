"""The adaptive schedule's replay buffer of student samples, and its state in checkpoints.

Every process holds its own buffer of its own samples. A checkpoint stores it as
`replay_buffer_<process index>.safetensors` in the checkpoint folder (`save_replay_buffer`),
written before Trainer's `trainer_state.json`, the file that marks a checkpoint complete; resuming
reads it back (`load_replay_buffer`), so that a resumed run replays what the uninterrupted one
would have.
"""

from __future__ import annotations

import random
import warnings
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch

REPLAY_BUFFER_FILE = "replay_buffer_{process_index}.safetensors"
# The tensors of a stored buffer: each pair's tokens, concatenated, and the pairs' lengths.
_STATE_KEYS = ("prompt_ids", "prompt_lengths", "completion_ids", "completion_lengths")


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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The buffer as four 1-D int64 tensors (`_STATE_KEYS`), oldest pair first."""
        prompts = [prompt.reshape(-1).long() for prompt, _ in self._pairs]
        completions = [completion.reshape(-1).long() for _, completion in self._pairs]

        def lengths(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.tensor([len(part) for part in parts], dtype=torch.long)

        def concat(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

        return dict(
            zip(
                _STATE_KEYS,
                (concat(prompts), lengths(prompts), concat(completions), lengths(completions)),
                strict=True,
            )
        )

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the contents by those of `state_dict()`'s output (the latest `capacity`)."""
        prompts = state["prompt_ids"].split(state["prompt_lengths"].tolist())
        completions = state["completion_ids"].split(state["completion_lengths"].tolist())
        self._pairs.clear()
        self._pairs.extend(zip(prompts, completions, strict=True))


def save_replay_buffer(
    buffer: ReplayBuffer, checkpoint_dir: str | Path, process_index: int
) -> Path:
    """Write this process's `buffer` into `checkpoint_dir` (created if needed); return the file."""
    from safetensors.torch import save_file

    path = Path(checkpoint_dir) / REPLAY_BUFFER_FILE.format(process_index=process_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(buffer.state_dict(), str(temporary), metadata={"capacity": str(buffer.capacity)})
    temporary.replace(path)  # a reader sees the whole file or none
    return path


def load_replay_buffer(
    buffer: ReplayBuffer, checkpoint_dir: str | Path, process_index: int
) -> bool:
    """Fill `buffer` from this process's file in `checkpoint_dir`; False (and a warning) when the
    checkpoint has none (written by an older version, or by a run with fewer processes)."""
    from safetensors.torch import load_file

    path = Path(checkpoint_dir) / REPLAY_BUFFER_FILE.format(process_index=process_index)
    if not path.is_file():
        warnings.warn(
            f"{checkpoint_dir} holds no replay buffer for process {process_index} ({path.name}): "
            "the adaptive schedule's buffer restarts empty, so the resumed run replays other "
            "samples than the interrupted one would have.",
            stacklevel=2,
        )
        return False
    buffer.load_state_dict(load_file(str(path)))
    return True
