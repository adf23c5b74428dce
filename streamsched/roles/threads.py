"""Threads for sync handlers: a small pool of daemon threads fed by one queue.

``anyio.to_thread.run_sync`` with a limiter cost 125–170 µs of CPU per call here, this
pool 56–67 (``python -m streamsched.bench.thread_cost``). ``ThreadPoolExecutor`` is as quick,
but it joins its threads when the interpreter exits, so a handler stuck past its timeout
(Python cannot kill a thread) would keep a stopped worker alive. Daemon threads do not.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import queue
import threading
from collections.abc import Callable
from typing import Any


class _Call:
    __slots__ = ("abandoned", "context", "error", "fn", "future", "loop", "result", "settled", "started", "thread")

    def __init__(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.context = contextvars.copy_context()  # the handler sees the caller's context vars
        self.thread: int | None = None  # set while the call runs
        self.abandoned = False  # its caller stopped waiting (timeout or cancel)
        self.started = False  # taken by a thread (runs at most once)
        self.result: Any = None
        self.error: BaseException | None = None
        self.settled = False  # handed back to the event loop


class HandlerThreads:
    """Runs sync calls in threads: at most ``size`` at once, plus one more for each call
    that was abandoned and still runs, so a stuck handler does not take a slot for good."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads = 0
        self._busy = 0  # calls queued or running (touched on the event loop only)
        self._abandoned = 0  # of those, calls nobody waits for any more

    async def run(self, fn: Callable[[], Any], timeout_s: float | None, timeout_error: type[BaseException]) -> Any:
        """``fn()`` in a thread. Past ``timeout_s``, ``timeout_error`` is raised inside the
        thread (seen at the handler's next bytecode, as Dramatiq's time limits do) and
        :class:`TimeoutError` here. Cancelled, the caller stops waiting and the call runs on."""
        call = _Call(fn, asyncio.get_running_loop())
        self._busy += 1
        if self._threads < min(self._busy, self.size + self._abandoned):
            self._threads += 1
            threading.Thread(target=self._serve, name=f"streamsched-handler-{self._threads}", daemon=True).start()
        self._calls.put(call)
        try:
            async with asyncio.timeout(timeout_s):
                return await call.future
        except TimeoutError:
            if call.thread is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(call.thread), ctypes.py_object(timeout_error))
            raise
        finally:
            if not call.settled:
                call.abandoned = True
                self._abandoned += 1

    def close(self) -> None:
        """Let the idle threads end (a running call finishes first); no call may follow."""
        for _ in range(self._threads):
            self._calls.put(None)
        self._threads = 0

    def _settle(self, call: _Call) -> None:
        if call.settled:
            return
        call.settled = True
        self._busy -= 1
        if call.abandoned:
            self._abandoned -= 1
        elif not call.future.done():
            if call.error is None:
                call.future.set_result(call.result)
            else:
                call.future.set_exception(call.error)

    def _serve(self) -> None:
        call: _Call | None = None
        while True:
            try:
                if call is None:
                    call = self._calls.get()
                    if call is None:  # closed
                        return
                self._execute(call)
                call = None
            except BaseException:  # noqa: BLE001 - a timeout meant for a call that had just ended
                continue  # on with the call in hand: _execute never runs one twice

    def _execute(self, call: _Call) -> None:
        if not call.started:
            call.started = True
            if not call.abandoned:  # nobody waits for a call that timed out in the queue
                # What the caller gets if a late timeout lands around the call itself.
                call.error = RuntimeError("interrupted by a timeout meant for an earlier call")
                call.thread = threading.get_ident()
                try:
                    call.result = call.context.run(call.fn)
                    call.error = None
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    call.error = exc
                call.thread = None
        # A late timeout can land here too; _settle ignores a second delivery.
        while True:
            try:
                call.loop.call_soon_threadsafe(self._settle, call)
                return
            except RuntimeError:  # the loop is closed: nobody is waiting
                return
            except BaseException:  # noqa: BLE001 - a late injected timeout: deliver again
                continue
