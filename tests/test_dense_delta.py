import numpy as np
import pytest
import torch

from fedcommons.errors import UpdateRejectedError
from fedcommons.wire import decode_dense_delta
from fedcommons.wire.update import check_num_examples

REF = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}


def _arrays(**over: np.ndarray) -> dict[str, np.ndarray]:
    arrays = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
    arrays.update(over)
    return arrays


def test_valid_delta_is_returned_in_the_reference_dtype() -> None:
    out = decode_dense_delta(_arrays(b=np.ones(2, np.float64)), REF)
    assert out["b"].dtype == torch.float32 and torch.equal(out["w"], torch.ones(2, 2))


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        ({"w": np.ones((2, 2), np.float32)}, "wrong-tensors"),
        (_arrays(extra=np.ones(1, np.float32)), "wrong-tensors"),
        (_arrays(w=np.ones((4,), np.float32)), "wrong-shape"),
        (_arrays(b=np.ones(2, np.int64)), "wrong-dtype"),
        (_arrays(b=np.array([1.0, np.nan], np.float32)), "non-finite"),
        (_arrays(b=np.array([np.inf, 0.0], np.float32)), "non-finite"),
    ],
)
def test_bad_dense_delta_is_rejected_with_a_reason(arrays: dict, reason: str) -> None:
    """Inputs tried: a missing tensor, an unexpected tensor, a wrong shape, an int64
    tensor, a NaN and an Inf."""
    with pytest.raises(UpdateRejectedError) as info:
        decode_dense_delta(arrays, REF)
    assert info.value.reason == reason


@pytest.mark.parametrize("value", [None, 0, -3, 2.5, float("nan"), True, "12"])
def test_bad_example_counts_are_rejected(value: object) -> None:
    """Inputs tried: missing, zero, negative, fractional, NaN, bool and string counts."""
    with pytest.raises(UpdateRejectedError) as info:
        check_num_examples(value)
    assert info.value.reason == "bad-num-examples"
