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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
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

    def save_flat(self, path: Path, key: str, value: np.ndarray) -> None:
        """Write ``{key: value}`` atomically (temporary file, fsync, rename)."""
        try:
            if not self.directory.exists():
                self.directory.mkdir(parents=True, exist_ok=True)
                prune_stale_runs(self.directory.parent.parent, keep=self.directory.parent)
            atomic_write(path, st_save({key: np.ascontiguousarray(value)}))
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
        residual = state.load_flat(state.residual_path, flat.size, "residual")
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
    )
    norm = 0.0
    if use_ef:
        assert encoded.reconstruction is not None
        new_residual = flat - encoded.reconstruction
        norm = float(np.linalg.norm(new_residual))
        if np.isfinite(norm):
            state.save_flat(state.residual_path, "residual", new_residual.astype(np.float32))
        else:  # a diverged round must not poison every later one
            log.warning("client.residual_dropped", reason="non-finite delta")
            state.residual_path.unlink(missing_ok=True)
    return CompressionResult(encoded, norm, use_ef)
