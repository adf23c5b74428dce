"""How many tasks wait where, from one reading of JetStream's counts: what the cluster's
``/metrics`` (``queue_size``) and the dashboard (``GET /api/v1/cluster/queues``) both show.

Counted by the durables, never in a process (a count kept in a process is lost when it
restarts, and one process sees only its share). The stages, in the order a task meets them:

* ``ingress``: submissions in TASKS the masters have not settled (region ``""``; priority
  ``""`` for plain ``tasks.submit``);
* ``sched``: SCHED messages the regional schedulers have not settled (one may hold a batch
  of tasks);
* ``held``: tasks parked in their limits' lanes (concurrency keys, rate limits, fair shares);
* ``work``: tasks on WORK no worker has taken yet (an open breaker's stay here);
* ``delivered``: tasks the workers hold (running, waiting for a slot, being settled).
"""

from __future__ import annotations

import msgspec

from . import subjects
from .config import Settings
from .roles.limits import lanes
from .transport.bus import Bus
from .transport.pull import consumer_loads

STAGES = ("ingress", "sched", "held", "work", "delivered")


class QueueDepth(msgspec.Struct, frozen=True):
    """Tasks waiting at one stage, region, priority and type (``""`` where the stage does not know it)."""

    stage: str
    region: str
    priority: str
    type: str
    tasks: int


async def queue_depths(bus: Bus, settings: Settings) -> list[QueueDepth]:
    """Every durable's and lane's count, zeros included (one consumer listing per stream)."""
    found: list[QueueDepth] = []
    by_name = {subjects.MASTER_CONSUMER: "", **{subjects.master_consumer(p): p for p in settings.priorities}}
    for consumer in await consumer_loads(bus, subjects.TASKS_STREAM):
        if consumer.name in by_name:
            found.append(QueueDepth("ingress", "", by_name[consumer.name], "", consumer.num_pending + consumer.num_ack_pending))
    for consumer in await consumer_loads(bus, subjects.SCHED_STREAM):
        parts = consumer.filter_subject.split(".")
        if len(parts) == 3 and parts[0] == "sched":
            found.append(QueueDepth("sched", parts[1], parts[2], "", consumer.num_pending + consumer.num_ack_pending))
    found += [QueueDepth("held", lane.region, lane.priority, lane.type, lane.parked) for lane in await lanes(bus, settings)]
    for consumer in await consumer_loads(bus, subjects.WORK_STREAM):
        parsed = subjects.parse_work(consumer.filter_subject)
        if parsed is not None:
            region, priority, task_type = parsed
            found.append(QueueDepth("work", region, priority, task_type, consumer.num_pending))
            found.append(QueueDepth("delivered", region, priority, task_type, consumer.num_ack_pending))
    return found
