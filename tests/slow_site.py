"""A site whose local training takes longer: the digits task plus a fixed delay.

Used by the deployment test that kills a SuperNode mid-round: its delay keeps the site
busy for ``train-delay`` seconds after it received the round's message, so the kill
lands while the round is open, every time.
"""

from __future__ import annotations

import time

from torch.utils.data import DataLoader

from fedcommons.tasks.digits import DigitsTask


class SlowDigitsTask(DigitsTask):
    """The digits task; each training pass starts ``train-delay`` seconds late."""

    def train_loader(self, batch_size: int, seed: int) -> DataLoader:
        """The digits loader, after sleeping ``train-delay`` seconds (node config)."""
        time.sleep(float(self.options.get("train-delay", 0)))
        return super().train_loader(batch_size, seed)
