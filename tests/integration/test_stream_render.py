"""What NACK would make from ``streams render --format nack`` is what ``streams apply`` made:
for every rendered resource, on a server where ``apply`` (and a worker) made the streams,
buckets and durables, each field of the spec is the server's value, and each field the spec
leaves out has the value the server gives a stream or durable that sets nothing.

This is the check of the KV buckets' streams too (rendered from what nats-py's
``create_key_value`` is known to make) and of the mapping of every field to NACK's spelling."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from streamsched import nack, subjects
from streamsched.config import Settings
from streamsched.transport import streams
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio
#: Fields that name the thing (or that the server keeps for itself), not how it behaves.
IDENTITY = {"name", "durable_name", "subjects", "filter_subject", "metadata"}


async def api(bus: Bus, subject: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JetStream API request's answer, as the server spells it (nanoseconds, every field)."""
    reply = await bus.nc.request(subject, json.dumps(body or {}).encode(), timeout=5)
    answer: dict[str, Any] = json.loads(reply.data)
    assert "error" not in answer, answer
    return answer


def agree(rendered: Mapping[str, Any], server: Mapping[str, Any], bare: Mapping[str, Any], fields: Mapping[str, nack.Field]) -> list[str]:
    """Where a rendered spec and the server's config differ (the field and both values)."""
    wrong = []
    by_nack_name = {nack_name: (api_name, convert) for api_name, (nack_name, convert) in fields.items()}
    for nack_name, value in rendered.items():
        api_name, convert = by_nack_name[nack_name]
        if api_name in server and convert(server[api_name]) != value:
            wrong.append(f"{nack_name}: rendered {value!r}, server {server[api_name]!r}")
        elif api_name not in server and value not in (False, 0, "", None, []):  # the server leaves out what is off
            wrong.append(f"{nack_name}: rendered {value!r}, server has none")
    said = {by_nack_name[name][0] for name in rendered}
    for key, value in server.items():
        if key not in said and key not in IDENTITY and value != bare.get(key):
            wrong.append(f"{key}: the server has {value!r} where nothing set gives {bare.get(key)!r}, and the spec leaves it out")
    return wrong


async def test_nack_would_make_every_stream_bucket_and_durable_as_apply_made_it(settings: Settings, bus: Bus) -> None:
    await streams.ensure_work_consumers(bus, settings, settings.regions[0], ["echo"])  # what a worker makes
    bare_stream = (await api(bus, "$JS.API.STREAM.CREATE.BARE", {"name": "BARE", "subjects": ["bare.>"]}))["config"]
    bare_consumer = (await api(bus, "$JS.API.CONSUMER.CREATE.BARE.bare", {"stream_name": "BARE", "config": {"durable_name": "bare"}}))["config"]

    resources = nack.resources(settings, task_types=["echo"])
    assert {item["spec"]["name"] for item in resources if item["kind"] == "Stream"} == {
        *(config.name for config in streams.stream_configs(settings)),
        *(f"KV_{kv.bucket}" for kv in streams.kv_configs(settings)),
    }
    checked = 0
    for item in resources:
        spec = dict(item["spec"])
        if item["kind"] == "Stream":
            assert spec.pop("preventDelete") is True
            server = (await api(bus, f"$JS.API.STREAM.INFO.{spec['name']}"))["config"]
            assert agree(spec, server, bare_stream, nack.STREAM_FIELDS) == [], spec["name"]
        else:
            stream = spec.pop("streamName")
            server = (await api(bus, f"$JS.API.CONSUMER.INFO.{stream}.{spec['durableName']}"))["config"]
            assert agree(spec, server, bare_consumer, nack.CONSUMER_FIELDS) == [], spec["durableName"]
        checked += 1
    assert checked == len(resources)
    assert any(item["spec"].get("durableName") == subjects.work_consumer("default", "high", "echo") for item in resources)


async def test_the_check_sees_a_field_the_spec_gets_wrong_or_leaves_out(settings: Settings, bus: Bus) -> None:
    [tasks] = [item["spec"] for item in nack.resources(settings) if item["spec"].get("name") == subjects.TASKS_STREAM]
    tasks.pop("preventDelete")
    server = (await api(bus, f"$JS.API.STREAM.INFO.{subjects.TASKS_STREAM}"))["config"]
    bare = {**server, "max_bytes": -1}  # as if the server's default were no limit
    assert agree({**tasks, "maxAge": "1h"}, server, server, nack.STREAM_FIELDS) == [f"maxAge: rendered '1h', server {server['max_age']}"]
    left_out = {key: value for key, value in tasks.items() if key != "maxBytes"}
    assert [line.split(":")[0] for line in agree(left_out, server, bare, nack.STREAM_FIELDS)] == ["max_bytes"]
