"""Stored messages without a consumer: batched direct gets (``$JS.API.DIRECT.GET``), and deletes.

nats-py asks for one message at a time; the server answers a ``batch`` request with each
message and then a status-204 end (404: none). Used to look through a subject's queued
messages (a task to move to another priority, the oldest tasks of a lane) without a
consumer. :func:`delete` takes one off its stream without overwriting its bytes first,
which nats-py's ``delete_msg`` asks for (a secure erase: milliseconds each).
"""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass

import msgspec
from nats.js.errors import APIError

from . import wire
from .bus import Bus

#: Headers the server adds to a direct get's answer (they describe where it was stored).
SERVER_HEADERS = ("Nats-Stream", "Nats-Subject", "Nats-Sequence", "Nats-Time-Stamp", "Nats-Num-Pending", "Nats-Last-Sequence")


@dataclass(frozen=True)
class Found:
    """One stored message: its subject, stream sequence, own header block, body and the time
    it was stored (Unix seconds)."""

    subject: str
    seq: int
    headers: bytes
    data: bytes
    stored_at: float


async def next_on_subject(bus: Bus, stream: str, subject: str, start_seq: int, batch: int, *, timeout_s: float = 5.0) -> list[Found]:
    """Up to ``batch`` messages on ``subject`` from stream sequence ``start_seq`` on, in order."""
    found: list[Found] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_reply(_subject: str, _reply: str, data: bytes, raw_headers: bytes | None) -> None:
        raw = raw_headers or b""
        status = raw[9:12] if len(raw) > 12 and raw[8:9] == b" " else b""
        if status:  # the end (204), none (404), or an error
            if not done.done():
                if status in (b"204", b"404"):
                    done.set_result(None)
                else:
                    headers = wire.parse_headers(raw)
                    done.set_exception(APIError(code=int(status), description=headers.get("Description", "")))
            return
        try:  # this runs in the connection's read loop: nothing may escape it
            subject, seq = wire.header_value(raw, "Nats-Subject") or "", int(wire.header_value(raw, "Nats-Sequence") or 0)
            found.append(Found(subject, seq, _own(raw), data, _unix(wire.header_value(raw, "Nats-Time-Stamp") or "")))
        except ValueError as exc:
            if not done.done():
                done.set_exception(exc)

    async with bus.reply_subject(on_reply) as inbox:
        request = msgspec.json.encode({"seq": start_seq, "next_by_subj": subject, "batch": batch})
        bus.send(f"$JS.API.DIRECT.GET.{stream}", request, inbox)
        await asyncio.wait_for(done, timeout_s)
    return found


async def delete(bus: Bus, stream: str, seq: int, *, timeout_s: float = 5.0) -> None:
    """Delete the message at ``seq`` from ``stream`` (``no_erase``); raises :class:`APIError`
    (``err_code`` 10057 when it is not stored: deleted already)."""
    reply = await bus.nc.request(f"$JS.API.STREAM.MSG.DELETE.{stream}", b'{"seq":%d,"no_erase":true}' % seq, timeout=timeout_s)
    answer = msgspec.json.decode(reply.data)
    if "error" in answer:
        error = answer["error"]
        raise APIError(code=error.get("code"), err_code=error.get("err_code"), description=error.get("description"))


def _unix(stamp: str) -> float:
    """An RFC 3339 time as the server writes it (nanoseconds, ``Z``) in Unix seconds; 0 if absent."""
    if not stamp:
        return 0.0
    whole, _, rest = stamp.rstrip("Z").partition(".")
    moment = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC)
    return moment.timestamp() + (float("0." + rest) if rest else 0.0)


def _own(raw: bytes) -> bytes:
    """The header block as the message was published: without the server's own lines."""
    lines = raw.split(b"\r\n")
    kept = [line for line in lines[1:] if line and line.split(b":", 1)[0].decode(errors="replace") not in SERVER_HEADERS]
    return b"\r\n".join([b"NATS/1.0", *kept]) + b"\r\n\r\n"
