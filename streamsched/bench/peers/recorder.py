"""Counting a peer's completions without touching its broker.

The no-op task body calls :func:`record`: one ``time.time()`` and one ``list.append``. A
daemon thread in each worker process writes ``<pid>.prog`` (``count last_done``) every
20 ms, and the bench process sums those files. So the hot path costs every peer the same
and the broker sees only the peer's own traffic.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

#: The folder for the progress files, given to the worker processes in their environment.
PROGRESS_DIR_ENV = "STREAMSCHED_PEERS_PROGRESS_DIR"
#: The broker URL, likewise: a worker started by its framework's CLI imports the peer module
#: by name, so its environment is the only way to tell it where the broker is.
BROKER_URL_ENV = "STREAMSCHED_PEERS_BROKER_URL"

FLUSH_S = 0.02

_recorder: _Recorder | None = None
_lock = threading.Lock()


class _Recorder:
    def __init__(self, folder: Path) -> None:
        self.pid = os.getpid()
        self.done: list[float] = []  # list.append is atomic, so worker threads need no lock
        self.path = folder / f"{self.pid}.prog"
        threading.Thread(target=self._flush, daemon=True, name="peers-recorder").start()

    def _flush(self) -> None:
        flushed, last = 0, 0.0
        while True:
            time.sleep(FLUSH_S)
            count = len(self.done)
            if count == flushed:
                continue
            last = max(last, max(self.done[flushed:count]))
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(f"{count} {last:.6f}")
            os.replace(tmp, self.path)  # the reader never sees half a file
            flushed = count


def record(submitted_at: float) -> None:
    """The no-op task's body. ``submitted_at`` is the workload's payload; only the completion time is kept."""
    global _recorder
    if _recorder is None or _recorder.pid != os.getpid():  # created lazily, and again after a fork
        with _lock:
            if _recorder is None or _recorder.pid != os.getpid():
                _recorder = _Recorder(Path(os.environ[PROGRESS_DIR_ENV]))
    _recorder.done.append(time.time())


def progress(folder: Path) -> tuple[int, float]:
    """Completions recorded so far by every worker process, and the ``time.time()`` of the last."""
    count, last = 0, 0.0
    for path in folder.glob("*.prog"):
        try:
            c, l_ = path.read_text().split()
        except (OSError, ValueError):
            continue
        count += int(c)
        last = max(last, float(l_))
    return count, last
