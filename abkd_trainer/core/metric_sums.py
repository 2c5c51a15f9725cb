"""Running sums behind a trainer's logged metrics, per mode, kept on the accelerator's device."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

MODES = ("train", "eval")


class MetricSums:
    """Per-mode (`"train"`, `"eval"`) float64 sums of named quantities between two logs.

    Kept on the accelerator's device, so that adding a micro-batch's sums never waits for it; a
    log reduces them over processes once (`pop`).

    Args:
        names: the summed quantities, in an order every process shares.
        device: where the sums live.
    """

    def __init__(self, names: Sequence[str], device: torch.device | str) -> None:
        self.names = tuple(names)
        self._totals = {
            mode: torch.zeros(len(self.names), dtype=torch.float64, device=device) for mode in MODES
        }

    def add(self, mode: str, sums: Mapping[str, torch.Tensor]) -> None:
        """Add one micro-batch's sums (detached; names missing from `sums` count 0).

        Raises:
            KeyError: a name that is not one of `names`.
        """
        unknown = set(sums) - set(self.names)
        if unknown:
            raise KeyError(f"Unknown metric sums {sorted(unknown)}; add them to the names.")
        totals = self._totals[mode]
        zero = totals.new_zeros(())
        totals += torch.stack(
            [sums[name].detach().to(totals) if name in sums else zero for name in self.names]
        )

    def pop(self, mode: str, accelerator: Accelerator) -> dict[str, float]:
        """The sums of `mode` since the last `pop`, summed over processes; then zero them.

        Every process must call it at the same points (it is a collective reduction).
        """
        sums = accelerator.reduce(self._totals[mode], reduction="sum")
        totals = dict(zip(self.names, sums.tolist(), strict=True))  # read before the reset
        self._totals[mode].zero_()
        return totals
