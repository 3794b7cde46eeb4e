"""Sparse encoded updates carry their support, so mask-aligned strategies align them."""

from pathlib import Path

import numpy as np
import torch

from fedcommons.client_sdk.client_app import app as client
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.wire.codec import decode_update, encode_update

DELTA = {"w": torch.tensor([[0.0, 5.0, 0.1], [-4.0, 0.2, 0.0]]), "b": torch.tensor([0.3, 3.0])}


def test_topk_decoded_update_has_its_support_as_mask() -> None:
    encoded = encode_update(DELTA, "topk:0.375", round_no=1)  # 3 of 8 entries
    decoded = decode_update(encoded.payload, DELTA, expected_round=1)
    assert decoded.mask is not None
    assert decoded.mask["w"].tolist() == [[False, True, False], [True, False, False]]
    assert decoded.mask["b"].tolist() == [False, True]
    for name, m in decoded.mask.items():
        assert torch.equal(decoded.delta[name] != 0, m)


def test_dense_decoded_update_has_no_mask() -> None:
    encoded = encode_update(DELTA, "int8", round_no=1, rng=np.random.default_rng(0))
    assert decode_update(encoded.payload, DELTA, expected_round=1).mask is None


def test_mask_aligned_round_over_topk_updates_publishes(tmp_path: Path) -> None:
    config = RunConfig(
        rounds=2,
        local_epochs=1,
        strategy="mask-aligned",
        compression="topk:0.05+int8",
        registry=str(tmp_path / "reg"),
        task_options={"num-partitions": 3},
    )
    result = run_in_process(
        config,
        [client] * 3,
        node_configs=[{"state-dir": str(tmp_path / f"state{i}")} for i in range(3)],
    )
    assert [r.accepted for r in result.reports] == [3, 3]
    assert result.release.manifest().compression == "topk:0.05+int8"
