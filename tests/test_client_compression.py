"""Client-side compression: error feedback, its persisted residual, and FISH masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedcommons.client_sdk.compression import ClientState, compress_delta
from fedcommons.client_sdk.fish_mask import empirical_fisher, fish_mask
from fedcommons.client_sdk.training import train_local
from fedcommons.errors import ClientStateError
from fedcommons.fileio import default_state_root
from fedcommons.tasks.digits import DigitsTask
from fedcommons.wire.codec import CompressionSpec, decode_update, flatten


def deltas(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g)} for _ in range(n)
    ]


def send(state: ClientState, delta: dict[str, torch.Tensor], spec: str, r: int, ef: bool = True):
    out = compress_delta(
        delta,
        CompressionSpec.parse(spec),
        round_no=r,
        state=state,
        error_feedback=ef,
        rng=np.random.default_rng(r),
    )
    return flatten(decode_update(out.encoded.payload).delta)


@pytest.mark.parametrize("spec", ["topk:0.05", "int4", "topk:0.1+int8", "dense:bf16"])
def test_error_feedback_sends_everything_eventually(tmp_path: Path, spec: str) -> None:
    # Invariant of error feedback: sent so far + residual = sum of the true deltas.
    state = ClientState(tmp_path / "s")
    ds = deltas(5)
    sent = sum(send(state, d, spec, r) for r, d in enumerate(ds))
    residual = state.load_flat(state.residual_path, 1230, "residual")
    assert residual is not None
    np.testing.assert_allclose(sent + residual, sum(flatten(d) for d in ds), atol=1e-4)


def test_residual_survives_a_client_restart(tmp_path: Path) -> None:
    ds = deltas(2)
    first = ClientState.for_run({"state-dir": str(tmp_path)}, "run-a")
    sent1 = send(first, ds[0], "topk:0.05", 1)
    # A restarted client builds its state from the same directory and run tag.
    again = ClientState.for_run({"state-dir": str(tmp_path)}, "run-a")
    sent2 = send(again, ds[1], "topk:0.05", 2)
    residual = again.load_flat(again.residual_path, 1230, "residual")
    np.testing.assert_allclose(sent1 + sent2 + residual, flatten(ds[0]) + flatten(ds[1]), atol=1e-5)
    assert again.residual_path == tmp_path / "runs" / "run-a" / "site" / "residual.safetensors"


def test_without_error_feedback_the_dropped_part_is_lost(tmp_path: Path) -> None:
    state = ClientState(tmp_path / "s")
    ds = deltas(3)
    for r, d in enumerate(ds):
        send(state, d, "topk:0.05", r, ef=False)
    assert not state.residual_path.exists()


def test_another_run_starts_without_residual(tmp_path: Path) -> None:
    a = ClientState.for_run({"state-dir": str(tmp_path), "partition-id": 3}, "run-a")
    b = ClientState.for_run({"state-dir": str(tmp_path), "partition-id": 3}, "run-b")
    send(a, deltas(1)[0], "topk:0.05", 1)
    assert a.residual_path.exists() and not b.residual_path.exists()
    assert a.directory.name == "partition-3"


def test_residual_of_another_model_size_is_ignored(tmp_path: Path) -> None:
    state = ClientState(tmp_path)
    state.save_flat(state.residual_path, "residual", np.ones(7, dtype=np.float32))
    sent = send(state, deltas(1)[0], "dense:fp16", 1)
    np.testing.assert_allclose(sent, flatten(deltas(1)[0]), rtol=1e-3, atol=1e-3)


def test_unwritable_state_dir_is_a_typed_error(tmp_path: Path) -> None:
    """Input: a state directory below a regular file (cannot be created)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    state = ClientState(blocker / "state")
    with pytest.raises(ClientStateError):
        send(state, deltas(1)[0], "topk:0.05", 1)


def test_state_root_defaults_to_xdg_state_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FEDCOMMONS_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_root() == tmp_path / "fedcommons"


# -- FISH ---------------------------------------------------------------------------------
def small_task() -> tuple[DigitsTask, dict[str, torch.Tensor]]:
    task = DigitsTask({"hidden": "8", "num-partitions": 10, "partition-id": 0, "device": "cpu"})
    base = {k: v.detach().clone() for k, v in task.build_model().state_dict().items()}
    return task, base


def test_empirical_fisher_is_the_mean_squared_per_example_gradient() -> None:
    task, base = small_task()
    fisher = empirical_fisher(task, base, num_examples=20, seed=3)
    # Reference: one backward pass per example, same examples in the same order.
    model = task.build_model()
    model.load_state_dict(base)
    x, y = next(iter(task.train_loader(batch_size=64, seed=3)))
    expected = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for i in range(20):
        model.zero_grad()
        task.loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            expected[k] += p.grad.detach() ** 2 / 20
    for k, v in expected.items():
        torch.testing.assert_close(fisher[k], v, rtol=1e-4, atol=1e-7)


def test_fish_mask_keeps_the_top_fisher_fraction_globally() -> None:
    task, base = small_task()
    mask = fish_mask(task, base, density=0.1, num_examples=32, seed=0)
    fisher = empirical_fisher(task, base, num_examples=32, seed=0)
    scores = np.concatenate([fisher[k].reshape(-1).numpy() for k in base])
    k = round(0.1 * scores.size)
    assert mask.sum() == k
    assert scores[mask].min() >= scores[~mask].max()


def test_fish_training_moves_only_masked_parameters() -> None:
    task, base = small_task()
    mask = fish_mask(task, base, density=0.05, num_examples=32, seed=0)
    grad_mask, offset = {}, 0
    for k, v in base.items():
        grad_mask[k] = torch.from_numpy(
            mask[offset : offset + v.numel()].reshape(v.shape).astype(np.float32)
        )
        offset += v.numel()
    result = train_local(task, base, epochs=1, lr=0.05, batch_size=16, seed=0, grad_mask=grad_mask)
    moved = flatten(result.delta) != 0
    assert moved.any() and not (moved & ~mask).any()


def test_fish_mask_is_computed_once_and_fixed_for_the_run(tmp_path: Path) -> None:
    state = ClientState(tmp_path)
    calls = []

    def make_mask() -> np.ndarray:
        calls.append(1)
        m = np.zeros(1230, dtype=bool)
        m[::10] = True
        return m

    for r, d in enumerate(deltas(3)):
        out = compress_delta(
            d,
            CompressionSpec.parse("fish:0.1"),
            round_no=r,
            state=state,
            error_feedback=True,
            rng=np.random.default_rng(0),
            mask_fn=make_mask,
        )
        sent = flatten(decode_update(out.encoded.payload).delta)
        assert set(np.flatnonzero(sent)) <= set(range(0, 1230, 10))
    assert len(calls) == 1


def test_a_new_run_prunes_run_dirs_untouched_for_30_days(tmp_path: Path) -> None:
    import os
    import time

    old = ClientState.for_run({"state-dir": str(tmp_path)}, "old-run")
    recent = ClientState.for_run({"state-dir": str(tmp_path)}, "recent-run")
    send(old, deltas(1)[0], "topk:0.05", 1)
    send(recent, deltas(1)[0], "topk:0.05", 1)
    long_ago = time.time() - 31 * 24 * 3600
    for p in [old.residual_path, old.directory, old.directory.parent]:
        os.utime(p, (long_ago, long_ago))
    new = ClientState.for_run({"state-dir": str(tmp_path)}, "new-run")
    send(new, deltas(1)[0], "topk:0.05", 1)
    assert not old.directory.parent.exists()
    assert recent.residual_path.exists() and new.residual_path.exists()


def test_a_round_run_again_starts_from_the_residual_held_before_it(tmp_path: Path) -> None:
    """The coordinator lost round 2 and runs it again: the client replays it exactly."""
    ds = deltas(3)
    state = ClientState(tmp_path / "s")
    sent1 = send(state, ds[0], "topk:0.05", 1)
    lost = send(state, ds[1], "topk:0.05", 2)
    again = send(state, ds[1], "topk:0.05", 2)  # same round, same delta: the same upload
    np.testing.assert_array_equal(lost, again)
    sent3 = send(state, ds[2], "topk:0.05", 3)
    # round 2 counted once: what was sent plus what is kept is what was trained
    residual = state.load_flat(state.residual_path, 1230, "residual")
    total = flatten(ds[0]) + flatten(ds[1]) + flatten(ds[2])
    np.testing.assert_allclose(sent1 + again + sent3 + residual, total, atol=1e-5)
