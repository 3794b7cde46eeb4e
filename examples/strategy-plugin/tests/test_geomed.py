"""The plugin's own tests: fedcommons' conformance kit plus what the rule promises."""

import torch
from fedcommons_geomed import geometric_median

from fedcommons.strategies import testing
from fedcommons.wire.update import ClientUpdate


def test_passes_the_fedcommons_conformance_kit() -> None:
    """Every check of fedcommons.strategies.testing applies to a buffered, stateless rule."""
    testing.run_conformance(geometric_median)


def test_one_outlier_does_not_drag_the_median() -> None:
    """One client in three sends a huge update; the result stays near the other two."""
    base = {"w": torch.zeros(2)}
    points = ([1.0, 1.0], [1.1, 0.9], [1e6, -1e6])
    ups = [ClientUpdate({"w": torch.tensor(v)}, 1) for v in points]
    step = testing.run_round(geometric_median, base, ups)["w"]
    assert step.abs().max() < 2.0
