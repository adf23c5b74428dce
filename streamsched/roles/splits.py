"""Split (map/reduce): a task with ``split`` fans out into chunk tasks, gathered in chunk order.

Shapes of ``split`` (:class:`Split`; anything else is rejected with the reason):

* ``{"chunks": [payload, ...]}``: one chunk per payload;
* ``{"range": [start, stop], "parts": N}``: ``N`` chunks over the integers ``start`` to
  ``stop`` (stop excluded), each with the payload ``{"start": a, "stop": b}``;
* either with ``"gather": "<type>"``: the handler that receives the results.

The chunks run as ``<id>-c<i>`` (``i`` from 0), of the task's own type, priority and
region, in parallel, each retried on its own. The task's own id becomes the *gather*
task, which waits for every chunk (:mod:`streamsched.roles.dependencies`): with a
``gather`` type it then runs with the task's payload and reads the chunk results, in
chunk order, from ``current_task().dependency_results``; without one it succeeds at
once with the list of chunk results as its result. As chunks finish, the gather task
records ``progress`` (the share of chunks done); a chunk that ends dead (or failed,
cancelled) fails it with the reason naming the chunk.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec

from .. import subjects
from ..config import Settings
from ..errors import Rejected
from ..model import Envelope, Submission

#: The label naming a chunk's split task.
SPLIT_LABEL = "streamsched/split"


class Split(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The ``split`` field of a task."""

    chunks: list[Any] | None = None
    range: tuple[int, int] | None = None
    parts: int | None = None
    gather: str | None = None


_split_decoder = msgspec.json.Decoder(Split)


def parse(envelope: Envelope, settings: Settings) -> Split:
    """The task's split, checked; raises :class:`Rejected` with the reason."""
    try:
        split = _split_decoder.decode(msgspec.json.encode(envelope.split))
    except msgspec.DecodeError as exc:
        raise Rejected(f"not a valid `split`: {exc}") from None
    if (split.chunks is None) == (split.range is None):
        raise Rejected('`split` takes either "chunks" or "range" (with "parts")')
    count = len(split.chunks) if split.chunks is not None else split.parts
    if split.range is not None:
        start, stop = split.range
        if split.parts is None or not 1 <= split.parts <= stop - start:
            raise Rejected('`split` with "range": [start, stop] needs "parts" from 1 to stop - start')
    elif split.parts is not None:
        raise Rejected('`split`: "parts" goes with "range"')
    if not count or count > settings.max_split_chunks:
        raise Rejected(f"`split` must make 1 to {settings.max_split_chunks} chunks (max_split_chunks), not {count}")
    if envelope.id is not None and not subjects.is_token(chunk_id(envelope.id, count - 1)):
        raise Rejected(f"id {envelope.id!r} is too long for its chunk ids ({chunk_id(envelope.id, count - 1)!r})")
    return split


def chunk_id(task_id: str, index: int) -> str:
    return f"{task_id}-c{index}"


def chunk_payloads(split: Split) -> list[Any]:
    if split.chunks is not None:
        return split.chunks
    assert split.range is not None and split.parts is not None
    start, stop = split.range
    bounds = [start + (stop - start) * i // split.parts for i in range(split.parts + 1)]
    return [{"start": a, "stop": b} for a, b in itertools.pairwise(bounds)]


def fan_out(submission: Submission, settings: Settings) -> tuple[list[Submission], Submission, bool]:
    """The chunk tasks and the gather task (the task's own id) of a split submission, and
    whether the gather only collects the results (no ``gather`` type: it never runs)."""
    split = parse(submission, settings)
    task_id = submission.id
    assert task_id is not None
    labels = {**submission.labels, SPLIT_LABEL: task_id}
    chunks = [
        # The key is the split's own (taken with its submission), not each chunk's.
        msgspec.structs.replace(submission, id=chunk_id(task_id, i), payload=payload, split=None, labels=labels, idempotency_key=None)
        for i, payload in enumerate(chunk_payloads(split))
    ]
    gather = msgspec.structs.replace(
        submission,
        type=split.gather or submission.type,
        split=None,
        idempotency_key=None,
        depends_on=[chunk.id or "" for chunk in chunks],
        on_dependency_failure="cancel",
    )
    return chunks, gather, split.gather is None
