"""Resolve a task reference (built-in name, entry point, or ``module:attr``) to a Task."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from fedcommons.errors import UnknownTaskError
from fedcommons.tasks.base import Task, TaskOptions

#: Built-in tasks by name; third-party packages add theirs under the entry-point group
#: ``fedcommons.tasks``.
BUILTIN_TASKS: dict[str, str] = {
    "digits": "fedcommons.tasks.digits:DigitsTask",
    # the text tasks need the `text` extra (transformers, peft, the corpora)
    "rotten-tomatoes": "fedcommons.tasks.text:RottenTomatoesTask",
    "bbc-news": "fedcommons.tasks.text:BBCNewsTask",
}

ENTRY_POINT_GROUP = "fedcommons.tasks"


def _import_attr(ref: str) -> object:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise UnknownTaskError(
            f"task {ref!r} is neither a known task name ({', '.join(available_tasks())}) "
            "nor a 'package.module:ClassName' reference"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownTaskError(
            f"task {ref!r}: cannot import module {module_name!r}: {exc}"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise UnknownTaskError(f"task {ref!r}: module {module_name!r} has no {attr!r}") from exc


def available_tasks() -> list[str]:
    """Names of the built-in and entry-point tasks."""
    names = set(BUILTIN_TASKS)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def resolve_task_class(ref: str) -> type[Task]:
    """Return the Task subclass that ``ref`` names, or raise :class:`UnknownTaskError`."""
    if ref in BUILTIN_TASKS:
        target = _import_attr(BUILTIN_TASKS[ref])
    elif ":" in ref:
        target = _import_attr(ref)
    else:
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == ref]
        if not matches:
            raise UnknownTaskError(
                f"unknown task {ref!r}; known tasks: {', '.join(available_tasks())} "
                "(or give a 'package.module:ClassName' reference)"
            )
        target = matches[0].load()
    if not (isinstance(target, type) and issubclass(target, Task)):
        raise UnknownTaskError(f"task {ref!r} resolves to {target!r}, not a Task subclass")
    return target


def load_task(ref: str, options: TaskOptions | None = None) -> Task:
    """Instantiate the task ``ref`` with ``options`` (which the task validates)."""
    return resolve_task_class(ref)(options)
