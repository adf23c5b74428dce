"""The definition files as NACK resources (``streamsched streams render --format nack``).

NACK, the NATS JetStream controller for Kubernetes, creates streams and consumers from
``Stream`` and ``Consumer`` resources (``jetstream.nats.io/v1beta2``), whose spec spells the
API's fields in camel case with durations as Go duration strings (``max_age`` ->
``maxAge: 168h``). A KV bucket is rendered as the ``Stream`` named ``KV_<bucket>`` that
nats-py makes for it (:func:`~streamsched.transport.streams.kv_stream`), not as NACK's
``KeyValue``: NACK makes a bucket through nats.go, which allows per-message TTLs only with
a limit marker TTL, and the ``idempotency`` bucket needs them without one.

A field of a definition that has no NACK spelling is an error here, never left out.
Streams carry ``preventDelete: true``: deleting the resource (a ``kubectl delete -k``
of the wrong folder) then leaves the tasks and their history where they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from .config import Settings
from .transport import streams

API_VERSION = "jetstream.nats.io/v1beta2"
#: The label every resource carries (``kubectl get streams,consumers -l app.kubernetes.io/part-of=streamsched``).
LABELS = {"app.kubernetes.io/part-of": "streamsched"}

_NS_PER = (("h", 3_600_000_000_000), ("m", 60_000_000_000), ("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000), ("ns", 1))


def go_duration(nanoseconds: int) -> str:
    """A duration as Go's ``time.ParseDuration`` reads it, in its largest whole unit (``168h``, ``1500ms``)."""
    if nanoseconds == 0:
        return "0s"
    unit, size = next((unit, size) for unit, size in _NS_PER if nanoseconds % size == 0)
    return f"{nanoseconds // size}{unit}"


def _same(value: Any) -> Any:
    return value


def _durations(values: Sequence[int]) -> list[str]:
    return [go_duration(value) for value in values]


def _deliver_policy(value: str) -> str:
    """``by_start_sequence`` -> ``byStartSequence``: NACK's spelling of the API's values."""
    head, *rest = value.split("_")
    return head + "".join(word.title() for word in rest)


Field = tuple[str, Callable[[Any], Any]]
#: StreamConfig's API fields -> NACK Stream spec fields.
STREAM_FIELDS: dict[str, Field] = {
    "name": ("name", _same),
    "description": ("description", _same),
    "subjects": ("subjects", _same),
    "retention": ("retention", _same),
    "max_consumers": ("maxConsumers", _same),
    "max_msgs": ("maxMsgs", _same),
    "max_bytes": ("maxBytes", _same),
    "discard": ("discard", _same),
    "discard_new_per_subject": ("discardPerSubject", _same),
    "max_age": ("maxAge", go_duration),
    "max_msgs_per_subject": ("maxMsgsPerSubject", _same),
    "max_msg_size": ("maxMsgSize", _same),
    "storage": ("storage", _same),
    "num_replicas": ("replicas", _same),
    "no_ack": ("noAck", _same),
    "duplicate_window": ("duplicateWindow", go_duration),
    "sealed": ("sealed", _same),
    "deny_delete": ("denyDelete", _same),
    "deny_purge": ("denyPurge", _same),
    "allow_rollup_hdrs": ("allowRollup", _same),
    "compression": ("compression", _same),
    "first_seq": ("firstSequence", _same),
    "allow_direct": ("allowDirect", _same),
    "mirror_direct": ("mirrorDirect", _same),
    "allow_msg_ttl": ("allowMsgTtl", _same),
    "subject_delete_marker_ttl": ("subjectDeleteMarkerTtl", go_duration),
    "allow_msg_counter": ("allowMsgCounter", _same),
    "allow_atomic": ("allowAtomicPublish", _same),
    "allow_msg_schedules": ("allowMsgSchedules", _same),
    "persist_mode": ("persistMode", _same),
    "metadata": ("metadata", _same),
}
#: ConsumerConfig's API fields -> NACK Consumer spec fields.
CONSUMER_FIELDS: dict[str, Field] = {
    "durable_name": ("durableName", _same),
    "description": ("description", _same),
    "deliver_policy": ("deliverPolicy", _deliver_policy),
    "opt_start_seq": ("optStartSeq", _same),
    "opt_start_time": ("optStartTime", _same),
    "ack_policy": ("ackPolicy", _same),
    "ack_wait": ("ackWait", go_duration),
    "max_deliver": ("maxDeliver", _same),
    "backoff": ("backoff", _durations),
    "filter_subject": ("filterSubject", _same),
    "filter_subjects": ("filterSubjects", _same),
    "replay_policy": ("replayPolicy", _same),
    "rate_limit_bps": ("rateLimitBps", _same),
    "sample_freq": ("sampleFreq", _same),
    "max_waiting": ("maxWaiting", _same),
    "max_ack_pending": ("maxAckPending", _same),
    "flow_control": ("flowControl", _same),
    "idle_heartbeat": ("heartbeatInterval", go_duration),
    "headers_only": ("headersOnly", _same),
    "max_batch": ("maxRequestBatch", _same),
    "max_expires": ("maxRequestExpires", go_duration),
    "max_bytes": ("maxRequestMaxBytes", _same),
    "deliver_subject": ("deliverSubject", _same),
    "deliver_group": ("deliverGroup", _same),
    "inactive_threshold": ("inactiveThreshold", go_duration),
    "num_replicas": ("replicas", _same),
    "mem_storage": ("memStorage", _same),
    "metadata": ("metadata", _same),
}


def spec(api: Mapping[str, Any], fields: Mapping[str, Field]) -> dict[str, Any]:
    """``api`` (a config in the API's shape) in NACK's spelling; a field NACK lacks raises :class:`ValueError`."""
    missing = sorted(set(api) - set(fields))
    if missing:
        raise ValueError(f"NACK has no field for {', '.join(missing)} (in {api.get('name') or api.get('durable_name')})")
    return {fields[key][0]: fields[key][1](value) for key, value in api.items()}


def resource_name(*parts: str) -> str:
    """A Kubernetes name (lower case, digits and ``-``) for a stream or consumer name."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def _resource(kind: str, name: str, body: dict[str, Any], namespace: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = dict(LABELS)
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": body}


def resources(settings: Settings, *, namespace: str | None = None, task_types: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every stream and bucket as a ``Stream``, every role's durable as a ``Consumer``, then
    the WORK durables of ``task_types`` in each region (which the workers of those types
    would make at start: declared here, KEDA sees their lag before any worker runs)."""
    filled = streams.filled(settings)
    consumers = filled.consumers + [
        streams.filled_work_consumer(settings, region, priority, task_type)
        for region in settings.regions
        for priority in settings.priorities
        for task_type in task_types
    ]
    out = [
        _resource("Stream", resource_name(stream["name"]), {**spec(stream, STREAM_FIELDS), "preventDelete": True}, namespace)
        for stream in [*filled.streams, *map(streams.kv_stream, filled.kv)]
    ]
    for consumer in consumers:
        config = consumer["config"]
        body = {"streamName": consumer["stream_name"], **spec(config, CONSUMER_FIELDS)}
        out.append(_resource("Consumer", resource_name(consumer["stream_name"], config["durable_name"]), body, namespace))
    names = [(item["kind"], item["metadata"]["name"]) for item in out]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(f"two resources would have the same name: {clashes}")
    return out


def render(settings: Settings, *, namespace: str | None = None, task_types: Sequence[str] = ()) -> str:
    """:func:`resources` as one YAML document each, after a comment saying what they were made from."""
    head = (
        "# streamsched's streams, buckets and durables as NACK resources (jetstream.nats.io/v1beta2),\n"
        f"# made by `streamsched streams render --format nack` for {settings.replicas} replica(s), "
        f"regions {', '.join(settings.regions)}, priorities {', '.join(settings.priorities)}.\n"
    )
    items = resources(settings, namespace=namespace, task_types=task_types)
    return head + "".join(f"---\n{yaml.safe_dump(item, sort_keys=False)}" for item in items)
