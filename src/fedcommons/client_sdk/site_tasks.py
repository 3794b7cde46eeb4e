"""Which task code a site runs: its own choice, never the coordinator's.

A round's config and the run config (both written by the coordinator) name a task; a
``pkg.module:Class`` reference would make the institution import that module. Here the
site decides instead:

- ``task`` in the node config (``fedcommons client join --task``) is the site's task: it
  trains every round. A round may name it, or name a task in the site's allowlist (e.g.
  ``digits`` for a site whose own task is a data adapter of the digits model);
- without a site task, the round's task is loaded only if it is in the allowlist;
- the allowlist is the built-in task names, the tasks installed under the
  ``fedcommons.tasks`` entry-point group, the node config's ``allowed-tasks``
  (comma-separated) and ``$FEDCOMMONS_ALLOWED_TASKS`` (set by the engines that run
  simulated sites for their operator).

Anything else is refused with :class:`~fedcommons.errors.TaskRefusedError` before any
import; the ClientApp answers the round with an error reply the coordinator counts
under ``task-refused``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fedcommons.errors import TaskRefusedError
from fedcommons.tasks.loader import available_tasks

#: Node-config key: task names or ``pkg.module:Class`` references this site accepts.
ALLOWED_TASKS_KEY = "allowed-tasks"
#: Environment variable with more allowed task references (comma-separated).
ALLOWED_TASKS_ENV = "FEDCOMMONS_ALLOWED_TASKS"
#: The task of a round that names none (the ClientApp's default since #1).
DEFAULT_TASK = "digits"


def _split(value: Any) -> set[str]:
    return {part.strip() for part in str(value or "").split(",") if part.strip()}


def site_allowlist(node_config: Mapping[str, Any]) -> set[str]:
    """Every task reference this site accepts from a round (see the module docstring)."""
    allowed = set(available_tasks())
    allowed |= _split(node_config.get(ALLOWED_TASKS_KEY))
    allowed |= _split(os.environ.get(ALLOWED_TASKS_ENV))
    if node_config.get("task"):
        allowed.add(str(node_config["task"]))
    return allowed


def site_task_ref(requested: Any, node_config: Mapping[str, Any]) -> str:
    """The task reference this site trains for a round that asks for ``requested``.

    ``requested`` comes from the coordinator (round or run config; ``None`` if neither
    names one). Returns the site's own task when it set one, else ``requested`` if
    allowed; raises :class:`TaskRefusedError` otherwise (nothing has been imported).
    """
    site = str(node_config.get("task") or "")
    asked = str(requested or "")
    allowed = site_allowlist(node_config)
    if site:
        if not asked or asked == site or asked in allowed:
            return site
        raise TaskRefusedError(
            f"the round asks for task {asked!r}; this site trains its own task {site!r} and "
            f"serves rounds of {', '.join(sorted(allowed))} (node config "
            f"{ALLOWED_TASKS_KEY!r} adds more)"
        )
    ref = asked or DEFAULT_TASK
    if ref in allowed:
        return ref
    raise TaskRefusedError(
        f"the round asks for task {ref!r}, which this site has not allowed; it runs only "
        f"{', '.join(sorted(allowed))} (set 'task' or {ALLOWED_TASKS_KEY!r} in the node "
        "config to add one)"
    )
