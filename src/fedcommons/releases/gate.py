"""The validation gate: a release line's suite of tasks, scored before anything ships.

A :class:`ValidationSuite` holds :class:`ValidationTask` s, each a data loader, a metric,
a direction (``max``: higher is better, ``min``: lower is better) and a tolerance. The
gate scores the candidate and its parent on the same data, on the same device (CUDA when
present, else CPU), and applies the policy:

- no task may be worse than the parent by more than its tolerance (absolute, in the
  metric's unit);
- the target task must not get worse at all (``target_policy="no-worse"``, the default),
  or only within its tolerance (``"tolerance"``);
- a metric that is not finite fails.

Without a parent (a line's first release) the candidate is compared with the line's
starting weights, the model before round 1 (``start``): every target task must *beat*
them by more than its tolerance. A run whose rounds did not move the model past its own
initialisation (a chance-level classifier) publishes nothing. The other tasks are scored
against the starting weights and recorded, not enforced: an untrained model is no
release anyone depends on, and its near-uniform outputs give a loss (ln 10 for ten
classes) that an early, still overconfident model often exceeds while far more accurate.
Without a parent and without starting weights every task is only scored and recorded.
``floor`` values (optional absolute minimums) apply in every case.

Where does a suite come from? Run-config key ``validation-suite``: empty means the task's
own ``validation_suite()`` method if it has one, else :func:`default_suite` over the
task's ``validation_loader()`` (for the built-in ``digits`` task: its fixed validation
split). ``package.module:function`` names a function ``(task) -> ValidationSuite``.

Every data set the gate reads is fingerprinted (SHA-256 over its inputs and targets,
streamed), so the manifest says exactly what a release was tested on.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedcommons.errors import ConfigError
from fedcommons.logs import get_logger
from fedcommons.tasks import Task

log = get_logger("fedcommons.gate")

TARGET_POLICIES = ("no-worse", "tolerance")


class Metric(ABC):
    """A streaming metric: ``update`` per batch, ``compute`` at the end."""

    direction = "max"

    def __init__(self, task: Task) -> None:
        self.task = task

    @abstractmethod
    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Fold one batch in."""

    @abstractmethod
    def compute(self) -> float:
        """The metric's value."""


class Accuracy(Metric):
    """Top-1 accuracy of class logits."""

    def __init__(self, task: Task) -> None:
        super().__init__(task)
        self.correct = self.total = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Count correct predictions."""
        self.correct += int((outputs.argmax(dim=1) == targets).sum())
        self.total += len(targets)

    def compute(self) -> float:
        """Correct / total (NaN when empty)."""
        return self.correct / self.total if self.total else math.nan


class MeanLoss(Metric):
    """The task's loss, averaged over examples."""

    direction = "min"

    def __init__(self, task: Task) -> None:
        super().__init__(task)
        self.sum, self.total = 0.0, 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the batch's summed loss."""
        self.sum += float(self.task.loss(outputs, targets)) * len(targets)
        self.total += len(targets)

    def compute(self) -> float:
        """Mean loss (NaN when empty)."""
        return self.sum / self.total if self.total else math.nan


class WorstClassAccuracy(Metric):
    """Accuracy of the class the model does worst on (a per-group factor)."""

    def __init__(self, task: Task) -> None:
        super().__init__(task)
        self.correct: torch.Tensor | None = None
        self.total: torch.Tensor | None = None

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Per-class counts."""
        n = outputs.shape[1]
        hits = (outputs.argmax(dim=1) == targets).long().cpu()
        t = targets.long().cpu()
        correct = torch.bincount(t, weights=hits.double(), minlength=n)
        total = torch.bincount(t, minlength=n).double()
        self.correct = correct if self.correct is None else self.correct + correct
        self.total = total if self.total is None else self.total + total

    def compute(self) -> float:
        """Minimum per-class accuracy over the classes present."""
        if self.total is None or self.correct is None or not (self.total > 0).any():
            return math.nan
        present = self.total > 0
        return float((self.correct[present] / self.total[present]).min())


METRICS: dict[str, type[Metric]] = {
    "accuracy": Accuracy,
    "loss": MeanLoss,
    "worst-class-accuracy": WorstClassAccuracy,
}


@dataclass(frozen=True)
class ValidationTask:
    """One check of the suite: a data set, a metric, a direction and a tolerance."""

    name: str
    dataset: str
    loader: Callable[[], DataLoader]
    metric: str | type[Metric] = "accuracy"
    direction: str = ""  # "" takes the metric's own direction
    tolerance: float = 0.0
    target: bool = False
    floor: float | None = None  # optional absolute bound (min for max, max for min)

    def metric_class(self) -> type[Metric]:
        """The :class:`Metric` subclass to instantiate."""
        if isinstance(self.metric, str):
            if self.metric not in METRICS:
                raise ConfigError(
                    f"validation task {self.name!r}: unknown metric {self.metric!r}; "
                    f"built-in: {', '.join(METRICS)}"
                )
            return METRICS[self.metric]
        return self.metric

    @property
    def metric_name(self) -> str:
        """Printable metric name."""
        return self.metric if isinstance(self.metric, str) else self.metric.__name__

    @property
    def resolved_direction(self) -> str:
        """``max`` or ``min``."""
        return self.direction or self.metric_class().direction


@dataclass(frozen=True)
class ValidationSuite:
    """The checks a release line must pass."""

    name: str
    tasks: tuple[ValidationTask, ...]
    target_policy: str = "no-worse"

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"suite {self.name!r}: task names repeat: {names}")
        if self.target_policy not in TARGET_POLICIES:
            raise ConfigError(
                f"target policy {self.target_policy!r} is not one of {', '.join(TARGET_POLICIES)}"
            )
        for t in self.tasks:
            t.metric_class()
            if t.resolved_direction not in {"max", "min"}:
                raise ConfigError(f"validation task {t.name!r}: direction must be max or min")
            if not t.tolerance >= 0:
                raise ConfigError(f"validation task {t.name!r}: tolerance must be >= 0")


def default_suite(task: Task) -> ValidationSuite:
    """The built-in suite over ``task.validation_loader()`` (classification tasks).

    For ``digits`` this is its fixed validation split: accuracy (the target, tolerance
    0.01), mean loss (tolerance 0.05) and worst-class accuracy (tolerance 0.05).
    """
    if task.validation_loader() is None:
        return ValidationSuite(f"{task.name}-none", ())
    dataset = f"{task.name}/validation"
    loader = task.validation_loader
    return ValidationSuite(
        f"{task.name}-builtin",
        (
            ValidationTask("accuracy", dataset, loader, "accuracy", tolerance=0.01, target=True),
            ValidationTask("loss", dataset, loader, "loss", tolerance=0.05),
            ValidationTask(
                "worst-class-accuracy", dataset, loader, "worst-class-accuracy", tolerance=0.05
            ),
        ),
    )


def load_suite(task: Task, reference: str = "", target_policy: str = "") -> ValidationSuite:
    """The suite of a run: ``reference`` (``module:function``), the task's, or the default."""
    if reference:
        module_name, _, attr = reference.partition(":")
        if not attr:
            raise ConfigError(f"validation-suite {reference!r} is not 'package.module:function'")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"validation-suite {reference!r} cannot be imported: {exc}") from exc
        suite = factory(task)
    elif callable(getattr(task, "validation_suite", None)):
        suite = task.validation_suite()  # type: ignore[attr-defined]
    else:
        suite = default_suite(task)
    if not isinstance(suite, ValidationSuite):
        raise ConfigError(f"validation suite factory returned {type(suite).__name__}")
    if target_policy:
        suite = ValidationSuite(suite.name, suite.tasks, target_policy)
    return suite


# -- scoring ------------------------------------------------------------------------------
@dataclass
class DatasetScore:
    """Metrics of one model on one data set, with the set's fingerprint."""

    values: dict[str, float]
    sha256: str
    examples: int
    seconds: float


class _Fingerprint:
    """SHA-256 of a stream of batches, independent of how the loader batches the data.

    The dtype and per-example shape are hashed once (again only if they change), then
    the raw bytes.
    """

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.layout: str | None = None

    def update(self, tensor: torch.Tensor) -> None:
        t = tensor.detach().cpu().contiguous()
        layout = f"{t.dtype}{list(t.shape[1:])}"
        if self.layout is None:
            self.layout = layout
            self.h.update(layout.encode())
        elif layout != self.layout:
            self.h.update(layout.encode())  # a ragged data set: record each change
            self.layout = layout
        self.h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _combine(inputs: _Fingerprint, targets: _Fingerprint) -> str:
    return hashlib.sha256((inputs.hexdigest() + targets.hexdigest()).encode()).hexdigest()


@torch.no_grad()
def score(
    task: Task,
    weights: Mapping[str, torch.Tensor],
    suite: ValidationSuite,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> dict[str, DatasetScore]:
    """Run the model over each data set of the suite once; every metric in one pass.

    ``progress(n)`` is called after each batch with its number of examples.
    """
    model = task.build_model()
    model.load_state_dict(dict(weights), strict=True)
    model.to(device).eval()
    by_dataset: dict[str, list[ValidationTask]] = {}
    for t in suite.tasks:
        by_dataset.setdefault(t.dataset, []).append(t)
    scores: dict[str, DatasetScore] = {}
    for dataset, tasks in by_dataset.items():
        started = time.perf_counter()
        metrics = {t.name: t.metric_class()(task) for t in tasks}
        h_inputs, h_targets = _Fingerprint(), _Fingerprint()
        examples = 0
        for inputs, targets in tasks[0].loader():
            h_inputs.update(inputs)
            h_targets.update(targets)
            outputs = model(inputs.to(device))
            targets = targets.to(device)
            for m in metrics.values():
                m.update(outputs, targets)
            examples += len(targets)
            if progress is not None:
                progress(len(targets))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        fingerprint = _combine(h_inputs, h_targets)
        scores[dataset] = DatasetScore(
            {name: m.compute() for name, m in metrics.items()},
            fingerprint,
            examples,
            time.perf_counter() - started,
        )
    return scores


@dataclass
class TaskResult:
    """One task's verdict."""

    name: str
    dataset: str
    metric: str
    direction: str
    tolerance: float
    target: bool
    candidate: float
    parent: float | None
    change: float | None  # candidate − parent
    worse_by: float | None  # > 0: worse than the parent by this much
    passed: bool
    reason: str
    device: str
    seconds: float
    examples: int
    dataset_sha256: str


@dataclass
class GateReport:
    """The gate's verdict on a candidate (what the manifest's ``validation`` holds)."""

    suite: str
    target_policy: str
    passed: bool
    reasons: list[str]
    device: str
    seconds: float
    parent_version: str | None
    parent_source: str  # "recomputed" | "manifest" | "none"
    tasks: list[TaskResult] = field(default_factory=list)

    @property
    def degraded_tasks(self) -> list[str]:
        """Tasks on which the candidate is worse than the parent (even within tolerance).

        Empty for a first release: the starting weights it was compared with are no parent.
        """
        if self.parent_source == "start":
            return []
        return [t.name for t in self.tasks if t.worse_by is not None and t.worse_by > 0]

    @property
    def fingerprints(self) -> dict[str, str]:
        """Data set name -> SHA-256 fingerprint."""
        return {t.dataset: t.dataset_sha256 for t in self.tasks}

    def to_dict(self) -> dict:
        """JSON-friendly form."""
        return asdict(self)


def _parent_values_from_manifest(validation: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """(task name, dataset fingerprint) -> parent's recorded candidate value."""
    out = {}
    for t in validation.get("tasks", []):
        try:
            out[(t["name"], t["dataset_sha256"])] = float(t["candidate"])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def run_gate(
    task: Task,
    suite: ValidationSuite,
    candidate: Mapping[str, torch.Tensor],
    *,
    parent: Mapping[str, torch.Tensor] | None = None,
    parent_version: str | None = None,
    parent_validation: Mapping[str, Any] | None = None,
    start: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> GateReport:
    """Score ``candidate`` (and ``parent``) on ``suite`` and apply the policy.

    ``progress(n)`` is told the examples of every scored batch (a CLI progress bar).

    The parent is re-scored when its weights load into the task's model; when they do not
    (the architecture changed), the values its manifest recorded on the same data set
    (same fingerprint) are used; otherwise the task has no parent value. Without a
    parent, ``start`` (the line's starting weights) is scored instead and the candidate
    must beat it (``parent_source = "start"``).
    """
    device = device or task.device()
    started = time.perf_counter()
    cand_scores = score(task, candidate, suite, device, progress)
    parent_scores: dict[str, DatasetScore] | None = None
    parent_source = "none"
    if parent is not None:
        try:
            parent_scores = score(task, parent, suite, device, progress)
            parent_source = "recomputed"
        except RuntimeError as exc:  # state dict does not fit the candidate's architecture
            log.info("gate.parent_not_loadable", detail=str(exc).splitlines()[0])
    recorded = _parent_values_from_manifest(parent_validation or {})
    if parent_scores is None and recorded:
        parent_source = "manifest"
    beat_start = parent is None and not recorded and start is not None
    if beat_start:
        parent_scores = score(task, start, suite, device)  # type: ignore[arg-type]
        parent_source = "start"
    results: list[TaskResult] = []
    reasons: list[str] = []
    for t in suite.tasks:
        cs = cand_scores[t.dataset]
        value = cs.values[t.name]
        direction = t.resolved_direction
        if parent_scores is not None:
            parent_value: float | None = parent_scores[t.dataset].values[t.name]
        else:
            parent_value = recorded.get((t.name, cs.sha256))
        change = worse_by = None
        passed, reason = True, "ok"
        if not math.isfinite(value):
            passed, reason = False, f"{t.name}: {t.metric_name} is not finite ({value})"
        elif t.floor is not None and (value < t.floor if direction == "max" else value > t.floor):
            passed = False
            reason = f"{t.name}: {t.metric_name} {value:.4f} beyond the floor {t.floor}"
        elif parent_value is not None and math.isfinite(parent_value):
            change = value - parent_value
            worse_by = -change if direction == "max" else change
            allowed = 0.0 if (t.target and suite.target_policy == "no-worse") else t.tolerance
            if beat_start and t.target:
                if -worse_by <= t.tolerance + 1e-12:
                    passed = False
                    reason = (
                        f"{t.name}: does not beat the starting weights: {t.metric_name} "
                        f"{parent_value:.4f} -> {value:.4f} (better by {-worse_by:.4f}, "
                        f"needs more than {t.tolerance:.4f})"
                    )
                else:
                    reason = f"beats the starting weights by {-worse_by:.4f}"
            elif beat_start:
                reason = f"{'worse' if worse_by > 0 else 'better'} than the starting weights by "
                reason += f"{abs(worse_by):.4f} (recorded, not enforced on a first release)"
            elif worse_by > allowed + 1e-12:
                passed = False
                what = "target task got worse" if t.target and allowed == 0 else "degraded"
                reason = (
                    f"{t.name}: {what}: {t.metric_name} {parent_value:.4f} -> {value:.4f} "
                    f"(worse by {worse_by:.4f}, allowed {allowed:.4f})"
                )
            elif worse_by > 0:
                reason = f"worse by {worse_by:.4f}, within tolerance {allowed:.4f}"
        elif parent_value is None and parent is not None:
            reason = "no comparable parent value (architecture changed, no recorded value)"
        else:
            reason = "no parent: recorded only"
        if not passed:
            reasons.append(reason)
        results.append(
            TaskResult(
                t.name,
                t.dataset,
                t.metric_name,
                direction,
                t.tolerance,
                t.target,
                value,
                parent_value,
                change,
                worse_by,
                passed,
                reason,
                str(device),
                cs.seconds,
                cs.examples,
                cs.sha256,
            )
        )
    if not suite.tasks:
        reasons_note = "suite has no tasks: the task has no validation data"
        log.warning("gate.empty_suite", suite=suite.name)
    else:
        reasons_note = ""
    report = GateReport(
        suite=suite.name,
        target_policy=suite.target_policy,
        passed=not reasons,
        reasons=reasons or ([reasons_note] if reasons_note else []),
        device=str(device),
        seconds=time.perf_counter() - started,
        parent_version=parent_version,
        parent_source=parent_source,
        tasks=results,
    )
    log.info("gate.finished", passed=report.passed, seconds=round(report.seconds, 3))
    return report


def fingerprint_loader(loader: DataLoader) -> str:
    """SHA-256 fingerprint of a loader's inputs and targets (as the gate computes it)."""
    h_inputs, h_targets = _Fingerprint(), _Fingerprint()
    for inputs, targets in loader:
        h_inputs.update(inputs)
        h_targets.update(targets)
    return _combine(h_inputs, h_targets)
