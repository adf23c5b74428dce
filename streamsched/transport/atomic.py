"""JetStream atomic batch publish (ADR-50): messages stored all together or not at all.

nats-py has no helper, so the headers are sent as nats-server expects them:
``Nats-Batch-Id`` on every message, ``Nats-Batch-Sequence`` from 1, and
``Nats-Batch-Commit: 1`` on the last, which is sent as a request: its reply is the
PubAck of the whole batch, or the error that rejected all of it. The stream needs
``allow_atomic``; a batch holds at most :data:`MAX_MESSAGES`, all for one stream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from .bus import Bus

#: nats-server's limit on messages in one atomic batch (err 10199 past it).
MAX_MESSAGES = 1000
#: nats-server's error code for a batch holding a ``Nats-Msg-Id`` it has already stored.
DUPLICATE_MSG_ID = 10201


class BatchRejected(Exception):
    """nats-server stored none of the batch; ``code`` is its error code."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{description} (err {code})")
        self.code = code


async def publish_atomic(bus: Bus, publications: Sequence[tuple[str, bytes, dict[str, str]]]) -> None:
    """Store every ``(subject, body, headers)`` (all of one stream) or none; raises
    :class:`BatchRejected` when the server refused the batch, a timeout when no answer came."""
    if not 0 < len(publications) <= MAX_MESSAGES:
        raise ValueError(f"an atomic batch holds 1 to {MAX_MESSAGES} messages, not {len(publications)}")
    batch_id = os.urandom(12).hex()
    *leading, (subject, body, headers) = publications
    # In order on one connection: the server takes the sequence as it arrives.
    for sequence, (lead_subject, lead_body, lead_headers) in enumerate(leading, 1):
        await bus.nc.publish(lead_subject, lead_body, headers={**lead_headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(sequence)})
    commit = {**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(len(publications)), "Nats-Batch-Commit": "1"}
    reply = await bus.nc.request(subject, body, timeout=bus.publish_timeout_s, headers=commit)
    answer = json.loads(reply.data)
    if "error" in answer:
        error = answer["error"]
        raise BatchRejected(int(error.get("err_code", 0)), str(error.get("description", "atomic batch rejected")))
