"""Record-level DP at an institution: Opacus DP-SGD with an accountant that persists.

Turned on and configured by the site itself, in its SuperNode's node config::

    flower-supernode ... --node-config 'dp-epsilon=3.0 dp-delta=1e-5 state-dir="/srv/fc"'

keys: ``dp-epsilon``, ``dp-delta`` (the institution's budget, required), ``dp-noise-multiplier``
(σ, default 1.0), ``dp-max-grad-norm`` (per-example clip norm, default 1.0),
``dp-accountant`` (``rdp`` default, or ``prv``) and ``state-dir`` (default
``$FEDCOMMONS_STATE_DIR`` or ``~/.local/state/fedcommons``, then ``client/site-<site-id>``,
``client/partition-<id>`` or ``client/site``: a stable site identity, never Flower's node
id, which changes when a node registers again; see :func:`~.receipts.site_state_dir`).

Unlike Flower's Opacus example, which creates a new ``PrivacyEngine`` every round so its
ε covers one round only, the accountant's history is loaded from
``<state-dir>/dp-sgd-accountant.json`` before each round and written back (atomically,
fsynced, under an exclusive lock) before the reply leaves: ε is cumulative over every
round and every run that used the state directory. A round whose planned steps would take
ε past the budget is refused before training (:class:`PrivacyBudgetExceededError`).

Training uses Poisson sampling (Opacus's ``DPDataLoader``), ``ModuleValidator.fix`` for
unsupported layers (e.g. BatchNorm → GroupNorm; tensors the fixed model lacks, such as
running statistics, get a zero delta) and strips the ``_module.`` prefix of the wrapped
model's state dict. Noise and batch sampling use generators seeded from the OS's entropy,
never from the run's public seed (the coordinator could otherwise replay the noise).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcommons.errors import ConfigError, PrivacyBudgetExceededError, PrivacyConfigError
from fedcommons.fileio import atomic_write, exclusive_lock
from fedcommons.privacy.accounting import Step, check_accountant, merge_history, runtime_epsilon
from fedcommons.privacy.client_spend import ClientSpend
from fedcommons.privacy.config import (
    check_clip_norm,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
)
from fedcommons.privacy.receipts import STATE_FILE, site_state_dir

STATE_SCHEMA = 1
NODE_KEYS = (
    "dp-epsilon",
    "dp-delta",
    "dp-noise-multiplier",
    "dp-max-grad-norm",
    "dp-accountant",
)
LOCK_TIMEOUT_S = 60.0
MODULE_PREFIX = "_module."


@dataclass(frozen=True)
class ClientDPConfig:
    """An institution's DP-SGD settings and budget (from its node config)."""

    epsilon: float
    delta: float
    state_dir: Path
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        check_epsilon("dp-epsilon", self.epsilon)
        check_delta("dp-delta", self.delta)
        check_noise_multiplier("dp-noise-multiplier", self.noise_multiplier)
        check_clip_norm("dp-max-grad-norm", self.max_grad_norm)
        try:
            check_accountant(self.accountant)
        except PrivacyConfigError as exc:
            raise PrivacyConfigError(f"dp-accountant: {exc}") from None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> ClientDPConfig | None:
        """Parse the ``dp-*`` node-config keys; ``None`` when the site set none."""
        if not any(k in node_config for k in NODE_KEYS):
            return None
        missing = [k for k in ("dp-epsilon", "dp-delta") if k not in node_config]
        if missing:
            raise PrivacyConfigError(
                f"record-level DP needs the institution's budget: set {', '.join(missing)} "
                "in the node config"
            )
        state_dir = site_state_dir(node_config)
        return cls(
            epsilon=check_epsilon("dp-epsilon", node_config["dp-epsilon"]),
            delta=check_delta("dp-delta", node_config["dp-delta"]),
            state_dir=state_dir,
            noise_multiplier=check_noise_multiplier(
                "dp-noise-multiplier", node_config.get("dp-noise-multiplier", 1.0)
            ),
            max_grad_norm=check_clip_norm(
                "dp-max-grad-norm", node_config.get("dp-max-grad-norm", 1.0)
            ),
            accountant=str(node_config.get("dp-accountant", "rdp")),
        )


class AccountantStore:
    """The persisted accountant of one state directory (history plus a round log)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / STATE_FILE

    def load(self, accountant: str) -> dict[str, Any]:
        """The stored state (a fresh one when the file does not exist)."""
        if not self.path.exists():
            return {"schema": STATE_SCHEMA, "accountant": accountant, "history": [], "rounds": []}
        try:
            state = json.loads(self.path.read_text())
            history = merge_history(state["history"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"DP accountant state {self.path} is unreadable ({exc}); refusing to train "
                "rather than reset the privacy spend"
            ) from None
        if state.get("accountant") != accountant:
            raise PrivacyConfigError(
                f"state {self.path} was kept with accountant {state.get('accountant')!r}, "
                f"node config asks for {accountant!r}: use a new state-dir to switch"
            )
        state["history"] = history
        return state

    def save(self, state: Mapping[str, Any]) -> None:
        """Write the state atomically (temp file, fsync, rename)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps(state, indent=1, sort_keys=True).encode()
        atomic_write(self.path, data)  # 0600: the site's private accounting state

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the state dir (bounded wait)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (
            (self.state_dir / ".lock").open("a") as fh,
            exclusive_lock(
                fh,
                LOCK_TIMEOUT_S,
                lambda: PrivacyBudgetExceededError(
                    f"DP state {self.state_dir} is locked by another round for "
                    f"{LOCK_TIMEOUT_S:.0f}s; not training"
                ),
            ),
        ):
            yield


def spent_epsilon(config: ClientDPConfig) -> float:
    """The institution's cumulative ε so far (from its state directory)."""
    state = AccountantStore(config.state_dir).load(config.accountant)
    return runtime_epsilon(state["history"], config.delta, config.accountant)


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(MODULE_PREFIX): v for k, v in state.items()}


def _prepare_model(task: Any, base: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Build, fix for Opacus, and load ``base`` into the task's model."""
    from opacus.validators import ModuleValidator

    model = ModuleValidator.fix(task.build_model())
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError(f"model cannot be trained with DP-SGD: {errors[0]}")
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in base:
            raise ConfigError(
                f"DP-SGD: the Opacus-compatible model has tensor {name!r} that the base "
                "release lacks; make the task's model DP-compatible"
            )
        if tuple(base[name].shape) != tuple(tensor.shape):
            raise ConfigError(f"DP-SGD: {name!r} has shape {tuple(tensor.shape)} after fixing")
    model.load_state_dict({k: base[k] for k in own}, strict=True)
    return model


@dataclass
class DPRoundResult:
    """Outcome of one DP-SGD round (the fields of ``LocalResult`` plus the spend)."""

    delta: dict[str, torch.Tensor]
    num_examples: int
    loss: float
    accuracy: float
    seconds: float
    spend: ClientSpend


def train_local_dp(
    task: Any,
    base: Mapping[str, torch.Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    dp: ClientDPConfig,
    round_no: int = 0,
    run_tag: str = "",
) -> DPRoundResult:
    """One round of DP-SGD from ``base``: the delta, metrics and the cumulative spend.

    Raises :class:`PrivacyBudgetExceededError` before training when the round's planned
    steps would take the institution past ``dp.epsilon``.
    """
    from opacus import PrivacyEngine

    started = time.perf_counter()
    store = AccountantStore(dp.state_dir)
    with store.locked():
        state = store.load(dp.accountant)
        history: list[Step] = state["history"]
        loader = task.train_loader(batch_size=batch_size, seed=seed)
        batches = len(loader)
        if batches == 0:
            raise ConfigError("DP-SGD: the institution's training loader is empty")
        sample_rate = 1.0 / batches
        planned = epochs * batches
        predicted = runtime_epsilon(
            [*history, (dp.noise_multiplier, sample_rate, planned)], dp.delta, dp.accountant
        )
        if predicted > dp.epsilon:
            spent = runtime_epsilon(history, dp.delta, dp.accountant)  # for the message only
            raise PrivacyBudgetExceededError(
                f"round {round_no} refused: its {planned} DP-SGD steps (σ="
                f"{dp.noise_multiplier:g}, q={sample_rate:.4g}) would take this institution "
                f"from ε={spent:.4g} to ε={predicted:.4g}, past its budget ε={dp.epsilon:g} "
                f"at δ={dp.delta:g}"
            )
        device = task.device()
        model = _prepare_model(task, base).to(device).train()
        optimizer = task.optimizer(model.parameters(), lr)
        with warnings.catch_warnings():  # "secure RNG turned off": see the module docstring
            warnings.simplefilter("ignore", UserWarning)
            engine = PrivacyEngine(accountant=dp.accountant)
        # Poisson batch sampling from a secret seed (Opacus uses this generator for its
        # DPDataLoader; without it, the loader's publicly seeded generator would be used).
        engine.secure_rng = torch.Generator().manual_seed(secrets.randbits(63))
        engine.accountant.load_state_dict(
            {"history": list(history), "mechanism": engine.accountant.mechanism()}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp_model, dp_optimizer, dp_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True,
                noise_generator=torch.Generator(device=device).manual_seed(secrets.randbits(63)),
            )
        loss_sum, correct, seen = 0.0, 0, 0
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            torch.manual_seed(seed)
            for _ in range(epochs):
                for inputs, targets in dp_loader:
                    inputs, targets = inputs.to(device), targets.to(device)
                    dp_optimizer.zero_grad(set_to_none=True)
                    outputs = dp_model(inputs)
                    loss = task.loss(outputs, targets)
                    loss.backward()  # empty Poisson batches still step (noise only)
                    dp_optimizer.step()
                    if len(targets):
                        loss_sum += float(loss.detach()) * len(targets)
                        correct += int((outputs.detach().argmax(dim=1) == targets).sum())
                        seen += len(targets)
        new_history = merge_history(engine.accountant.history)
        steps = sum(n for _, _, n in new_history)
        epsilon = runtime_epsilon(new_history, dp.delta, dp.accountant)
        trained = _strip_prefix(dp_model.state_dict())
        delta = {
            k: (trained[k].detach().cpu() - v.cpu()).to(v.dtype)
            if k in trained
            else torch.zeros_like(v)
            for k, v in base.items()
        }
        state["history"] = [list(h) for h in new_history]
        state.setdefault("rounds", []).append(
            {
                "round": round_no,
                "run": run_tag,
                "steps": steps - sum(n for _, _, n in history),
                "epsilon": epsilon,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        state["noise_multiplier"] = dp.noise_multiplier
        state["delta"] = dp.delta  # the δ every recorded ε is stated at
        state["max_grad_norm"] = dp.max_grad_norm
        store.save(state)  # before the reply leaves: the spend is never lost
    spend = ClientSpend(
        epsilon=epsilon,
        delta=dp.delta,
        accountant=dp.accountant,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        sample_rate=sample_rate,
        steps=steps,
        budget_epsilon=dp.epsilon,
        history=new_history,
    )
    return DPRoundResult(
        delta=delta,
        num_examples=len(loader.dataset),  # type: ignore[arg-type]
        loss=loss_sum / max(seen, 1),
        accuracy=correct / max(seen, 1),
        seconds=time.perf_counter() - started,
        spend=spend,
    )
