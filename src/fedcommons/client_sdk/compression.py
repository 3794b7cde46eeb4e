"""Client-side update compression with error feedback, and the client's state directory.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, "Error Feedback Fixes
SignSGD"): the client sends ``C(Δ + e)`` and keeps ``e ← Δ + e − D(C(Δ + e))``, the part
the lossy encoding could not carry, for the next round it is sampled in. The residual
``e`` never leaves the site: it lives in the client's state directory (safetensors,
replaced atomically) so it survives client restarts.

State directory: node-config ``state-dir`` (one per SuperNode), else the environment
variable ``FEDCOMMONS_STATE_DIR``, else ``$XDG_STATE_HOME/fedcommons`` (default
``~/.local/state/fedcommons``). Inside it, ``runs/<run-tag>/<site>/`` holds
``residual.safetensors`` and, for ``fish`` specs, ``fish-mask.safetensors``; ``<site>``
is ``partition-<id>`` when the node config names a partition (simulated institutions
share one machine), else ``site``.

The residual file records the round it was computed in (safetensors metadata), and the
residual it replaced is kept as ``residual.prev.safetensors``: when the coordinator runs a
round again (it crashed before committing the round, or retries it), the client starts
from the residual it held *before* that round, so the re-run reproduces the first attempt
exactly instead of counting the lost round's residual twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.numpy import save as st_save

from fedcommons.errors import ClientStateError
from fedcommons.fileio import atomic_write, default_state_root
from fedcommons.logs import get_logger
from fedcommons.wire.codec import (
    CompressionSpec,
    EncodedUpdate,
    encode_flat,
    flatten,
    layout_of,
)

log = get_logger("fedcommons.client")

STATE_DIR_OPTION = "state-dir"
#: Run directories untouched for this long are removed when a new run starts.
STALE_RUN_SECONDS = 30 * 24 * 3600
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class ClientState:
    """One site's persistent state for one run: residual and FISH mask."""

    directory: Path

    @classmethod
    def for_run(cls, node_config: Mapping[str, Any], run_tag: str) -> ClientState:
        """State of this node in run ``run_tag`` (see the module docstring for paths)."""
        root = node_config.get(STATE_DIR_OPTION)
        root_path = Path(str(root)).expanduser() if root else default_state_root()
        pid = node_config.get("partition-id")
        site = f"partition-{int(pid)}" if pid is not None else "site"
        tag = _SAFE.sub("_", run_tag or "untagged")
        return cls(root_path / "runs" / tag / site)

    @property
    def residual_path(self) -> Path:
        """Where the error-feedback residual lives."""
        return self.directory / "residual.safetensors"

    @property
    def previous_residual_path(self) -> Path:
        """The residual the current one replaced (the state before the latest round)."""
        return self.directory / "residual.prev.safetensors"

    @staticmethod
    def residual_round(path: Path) -> int | None:
        """The round a residual file was computed in (None: unknown or unreadable)."""
        try:
            with safe_open(str(path), framework="numpy") as fh:
                value = (fh.metadata() or {}).get("round")
            return int(value) if value is not None else None
        except Exception:  # absent, torn or foreign: the caller treats it as unknown
            return None

    def load_residual(self, round_no: int, size: int) -> np.ndarray | None:
        """The residual to add in round ``round_no``: the newest one from an earlier round.

        A residual computed in ``round_no`` itself or later belongs to an attempt the
        coordinator lost (it runs the round again): the previous residual is used instead.
        """
        for path in (self.residual_path, self.previous_residual_path):
            if not path.exists():
                continue
            made_in = self.residual_round(path)
            if made_in is None or made_in < round_no:
                return self.load_flat(path, size, "residual")
        return None

    def save_residual(self, round_no: int, value: np.ndarray) -> None:
        """Store the residual left after ``round_no``, keeping the one it replaces."""
        current = self.residual_round(self.residual_path)
        if self.residual_path.exists() and (current is None or current < round_no):
            try:
                self.residual_path.replace(self.previous_residual_path)
            except OSError as exc:
                raise ClientStateError(f"cannot keep residual {self.residual_path}: {exc}") from exc
        self.save_flat(self.residual_path, "residual", value, {"round": str(int(round_no))})

    @property
    def mask_path(self) -> Path:
        """Where the FISH mask lives."""
        return self.directory / "fish-mask.safetensors"

    def load_flat(self, path: Path, size: int, key: str) -> np.ndarray | None:
        """A stored flat vector of ``size`` values, or None if absent or of another size."""
        if not path.exists():
            return None
        try:
            value = load_file(str(path))[key]
        except Exception as exc:  # a torn or foreign file: start over, but say so
            log.warning("client.state_unreadable", path=str(path), error=str(exc))
            return None
        if value.size != size:
            log.warning("client.state_mismatch", path=str(path), stored=value.size, want=size)
            return None
        return value.reshape(-1)

    def save_flat(
        self, path: Path, key: str, value: np.ndarray, metadata: dict[str, str] | None = None
    ) -> None:
        """Write ``{key: value}`` atomically (temporary file, fsync, rename)."""
        try:
            if not self.directory.exists():
                self.directory.mkdir(parents=True, exist_ok=True)
                prune_stale_runs(self.directory.parent.parent, keep=self.directory.parent)
            atomic_write(path, st_save({key: np.ascontiguousarray(value)}, metadata=metadata))
        except OSError as exc:
            raise ClientStateError(f"cannot write client state {path}: {exc}") from exc


def load_or_compute_mask(
    state: ClientState, size: int, mask_fn: Callable[[], np.ndarray] | None
) -> np.ndarray:
    """The run's fixed FISH mask (uint8 0/1, flat): stored, else computed once and stored."""
    stored = state.load_flat(state.mask_path, size, "mask")
    if stored is not None:
        return stored.astype(np.uint8)
    if mask_fn is None:
        raise ClientStateError("fish compression needs a way to compute the mask")
    mask = np.asarray(mask_fn(), dtype=bool).astype(np.uint8)
    if mask.size != size:
        raise ClientStateError(f"FISH mask has {mask.size} entries, the model {size}")
    state.save_flat(state.mask_path, "mask", mask)
    return mask


def prune_stale_runs(runs_dir: Path, *, keep: Path, max_age: float = STALE_RUN_SECONDS) -> None:
    """Remove run directories under ``runs_dir`` not modified for ``max_age`` seconds.

    Residuals of finished runs are of no further use; this keeps the state directory
    from growing with every run. Errors are logged, never raised.
    """
    import shutil
    import time

    cutoff = time.time() - max_age
    try:
        for run_dir in runs_dir.iterdir():
            if run_dir == keep or not run_dir.is_dir():
                continue
            newest = max(
                (p.stat().st_mtime for p in run_dir.rglob("*")), default=run_dir.stat().st_mtime
            )
            if newest < cutoff:
                shutil.rmtree(run_dir, ignore_errors=True)
                log.info("client.state_pruned", run_dir=str(run_dir))
    except OSError as exc:
        log.warning("client.state_prune_failed", runs_dir=str(runs_dir), error=str(exc))


@dataclass
class CompressionResult:
    """What :func:`compress_delta` produced."""

    encoded: EncodedUpdate
    residual_norm: float
    error_feedback: bool


def compress_delta(
    delta: Mapping[str, torch.Tensor],
    spec: CompressionSpec,
    *,
    round_no: int,
    state: ClientState,
    error_feedback: bool,
    rng: np.random.Generator,
    shared_seed: int = 0,
    mask_fn: Callable[[], np.ndarray] | None = None,
) -> CompressionResult:
    """Encode ``delta`` as ``spec`` says, with error feedback when ``error_feedback``.

    Quantized codings round to nearest under error feedback and stochastically
    without it (see :mod:`fedcommons.wire.codec`).

    ``mask_fn`` computes the FISH mask; it is called only when no mask is stored for this
    run yet, and the result is stored (the mask stays fixed for the run).
    """
    layout = layout_of(delta)
    flat = flatten(delta)
    mask = None
    if spec.sparsifier == "fish":
        mask = load_or_compute_mask(state, flat.size, mask_fn).astype(bool)
    use_ef = error_feedback and spec.lossy
    if use_ef:
        residual = state.load_residual(round_no, flat.size)
        if residual is not None:
            flat = flat + residual
    encoded = encode_flat(
        flat,
        layout,
        spec,
        round_no=round_no,
        rng=rng,
        shared_seed=shared_seed,
        mask=mask,
        reconstruct=use_ef,
        # With error feedback the rounding error is carried into the next round, so
        # deterministic round-to-nearest (half the error, no random draws) is enough;
        # without it, only unbiased stochastic rounding keeps the mean update unbiased.
        rounding="nearest" if use_ef else "stochastic",
    )
    norm = 0.0
    if use_ef:
        assert encoded.reconstruction is not None
        new_residual = flat - encoded.reconstruction
        norm = float(np.linalg.norm(new_residual))
        if not np.isfinite(norm):  # a diverged round must not poison every later one
            log.warning("client.residual_dropped", reason="non-finite delta")
            new_residual = np.zeros_like(flat)
        state.save_residual(round_no, new_residual.astype(np.float32))
    return CompressionResult(encoded, norm, use_ef)
