"""A site whose private data cannot be read: every training pass raises.

Used to make a round fail for real (no valid reply reaches the coordinator) on an engine
that runs institutions in other processes.
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from fedcommons.tasks.digits import DigitsTask


class UnreadableDigitsTask(DigitsTask):
    """The digits task whose training data loader always fails."""

    def train_loader(self, batch_size: int, seed: int) -> DataLoader:
        """Raise, as a site whose data store is down would."""
        raise OSError("site data store unreachable")
