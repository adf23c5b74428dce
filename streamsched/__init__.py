"""streamsched: a distributed task scheduler for Python teams, built on NATS JetStream."""

from .client import Client, TaskHandle
from .config import Settings
from .errors import Fail, PermanentError, Retry, StreamschedError
from .model import Envelope, Status, TaskState
from .registry import TaskContext, current_batch, current_task, task
from .sync_client import SyncClient, SyncTaskHandle

__all__ = [
    "Client",
    "Envelope",
    "Fail",
    "PermanentError",
    "Retry",
    "Settings",
    "Status",
    "StreamschedError",
    "SyncClient",
    "SyncTaskHandle",
    "TaskContext",
    "TaskHandle",
    "TaskState",
    "current_batch",
    "current_task",
    "task",
]
__version__ = "0.1.0"
