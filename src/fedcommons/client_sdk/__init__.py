"""What a contributing institution installs: the Task interface and the Flower ClientApp.

Private data never leaves the site: the ClientApp receives base weights, trains locally
and replies with its delta, its example count and training metrics.
"""

from fedcommons.client_sdk.training import LocalResult, train_local
from fedcommons.tasks import Task, load_task, select_device

__all__ = ["LocalResult", "Task", "load_task", "select_device", "train_local"]
