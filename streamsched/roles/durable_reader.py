"""The shape of a master's side jobs that read one durable consumer of requests (cancels,
reprioritizations, what TIMERS fired): a credit puller, a settler, and run/shutdown."""

from __future__ import annotations

from ..config import Settings
from ..transport.bus import Bus
from ..transport.pull import Puller
from ..transport.wire import Delivery
from .settle import Settler


class DurableReader:
    """Reads durable ``consumer`` of ``stream``, at most ``window`` messages held at once;
    a subclass handles each in :meth:`_on_message` and settles it through ``self.settler``
    (which records its events as ``source``)."""

    def __init__(self, settings: Settings, bus: Bus, stream: str, consumer: str, window: int, *, source: str) -> None:
        self.settings = settings
        self.bus = bus
        self.puller = Puller(bus, stream, [consumer], window, self._on_message)
        self.settler = Settler(bus, self.puller, source=source, partitions=settings.projector_partitions)

    async def run(self) -> None:
        await self.puller.run()
        await self.puller.finish()

    async def shutdown(self) -> None:
        self.puller.stop()

    def _on_message(self, level: int, msg: Delivery) -> None:
        raise NotImplementedError
