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

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self._field = field

    @property
    def field(self) -> str | None:
        """The field the reason names (``priority``, ``batch.1.type``), when it names one: as
        given, as msgspec puts it (`` at `$.priority` ``) or as the checks quote it (`` `max_attempts` ``)."""
        if self._field is not None:
            return self._field
        text = str(self)
        if "at `$." in text:
            return text.rsplit("at `$.", 1)[1].split("`", 1)[0] or None
        if text.count("`") >= 2:
            return text.split("`", 2)[1] or None
        for name in ("type", "priority", "id", "region"):  # "type 'x' is not a valid handler name", "unknown priority 'x'"
            if text.startswith((f"{name} ", f"unknown {name} ")):
                return name
        return None


#: The name the interfaces use for a submission that failed its checks.
InvalidSubmission = Rejected


class Unavailable(StreamschedError):
    """NATS could not be reached (a command gives up; a role keeps waiting)."""


#: :attr:`Overloaded.limit` when the server, not the stream, ran out of room.
SERVER_STORAGE = "server storage"


class Overloaded(StreamschedError):
    """A stream was full, so JetStream refused a publish (after the client's retries, within
    ``submit_retry_budget_s``): nothing of it was stored, and sending it again later (with
    the same ids) is safe. ``str()`` names the stream, the limit and the setting that sets
    it: ``stream TASKS is full: max_bytes 2147483648 (tasks_max_bytes)``.
    """

    def __init__(
        self,
        stream: str | None,
        limit: str,
        *,
        value: int | None = None,
        setting: str | None = None,
        detail: str = "",
    ) -> None:
        """``limit`` is the stream's config field that refused the message (``max_bytes``,
        ``max_msgs``, ``max_msgs_per_subject``), or :data:`SERVER_STORAGE` when the
        server's (or the account's) JetStream storage had no room, whatever the stream's
        own limits; ``value`` its value, ``setting`` the streamsched setting it comes from."""
        self.stream = stream
        self.limit = limit
        self.value = value
        self.setting = setting
        if limit == SERVER_STORAGE:
            message = "the server's JetStream storage is full (its max_file_store, or the account's limit)"
            message += f": stream {stream} cannot grow" if stream else ""
        else:
            message = f"stream {stream} is full: {limit}" if stream else f"a stream is full: {limit}"
            message += (f" {value}" if value is not None else "") + (f" ({setting})" if setting else "")
        super().__init__(f"{message}; {detail}" if detail else message)


class NotFound(StreamschedError):
    """No task with that id (or no schedule with that name, no live worker with that id)."""


#: The name the interfaces use for an unknown task id.
TaskNotFound = NotFound


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
