"""One shallow exception tree. Handlers raise :class:`Retry` or :class:`Fail` to decide
what happens to a failed attempt; any other exception follows the task's retry policy."""

from __future__ import annotations


class StreamschedError(Exception):
    """Root of every streamsched exception."""


class ConfigError(StreamschedError):
    """Settings that cannot work (unknown key, bad value)."""


class Rejected(StreamschedError):
    """A submission (a task, a batch, a schedule) was invalid; ``str()`` is the reason given to the submitter."""

    #: The id the rejection is recorded under, when the submission had a usable one.
    task_id: str | None = None


class Unavailable(StreamschedError):
    """NATS could not be reached (a command gives up; a role keeps waiting)."""


class NotFound(StreamschedError):
    """No task with that id (or no schedule with that name, no live worker with that id)."""


class AlreadyFinished(StreamschedError):
    """The task reached a final status already (cancelling it changes nothing); ``status`` says which."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class TaskTimeout(StreamschedError):
    """An attempt ran past its ``timeout_s``; retried like any other error."""


class Retry(StreamschedError):
    """Raised by a handler: retry this task, after ``delay_s`` if given.

    Counts as an attempt, so ``max_attempts`` still bounds it.
    """

    def __init__(self, message: str = "retry requested", *, delay_s: float | None = None) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class Fail(StreamschedError):
    """Raised by a handler: the task failed permanently, do not retry."""


#: Alias that reads well at the raise site: ``raise PermanentError("bad address")``.
PermanentError = Fail
