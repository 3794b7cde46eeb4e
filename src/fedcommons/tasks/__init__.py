"""Tasks: what an institution plugs in (model, private data, loss) and the built-in ones.

Both sides use a task: the client SDK trains on the institution's private partition,
the coordinator builds the same model to evaluate candidates on its validation split.
"""

from fedcommons.tasks.base import Task, TaskOptions, select_device
from fedcommons.tasks.loader import BUILTIN_TASKS, load_task, resolve_task_class

__all__ = [
    "BUILTIN_TASKS",
    "Task",
    "TaskOptions",
    "load_task",
    "resolve_task_class",
    "select_device",
]
