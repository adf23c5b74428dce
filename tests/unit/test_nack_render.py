"""``streams render --format nack``: every resource is valid for NACK's CRDs (vendored in
tests/fixtures/nack/), and deploy/kubernetes/streams.yaml is the command's output."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from streamsched import nack, subjects
from streamsched.cli import app
from streamsched.config import Settings
from streamsched.registry import Registry

REPO = Path(__file__).parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
CRDS = REPO / "tests" / "fixtures" / "nack" / "crds.yml"
#: A Kubernetes object name (a DNS-1123 subdomain).
K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def strict(schema: Any) -> Any:
    """``schema`` refusing properties it does not name: Kubernetes would drop them without a word."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def spec_schemas() -> dict[str, Any]:
    """The ``spec`` schema of each kind's ``v1beta2``, by kind."""
    out = {}
    for crd in yaml.safe_load_all(CRDS.read_text()):
        version = next((v for v in crd["spec"]["versions"] if v["name"] == "v1beta2"), None)
        if version is None:  # StreamTemplate: v1beta1 only
            continue
        out[crd["spec"]["names"]["kind"]] = strict(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    return out


def without_streamsched_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("STREAMSCHED_")]:
        monkeypatch.delenv(name)


def test_every_resource_is_valid_for_nacks_crd_with_no_field_it_would_drop() -> None:
    schemas = spec_schemas()
    settings = Settings(regions=("default", "eu"), replicas=3)
    items = nack.resources(settings, namespace="jobs", task_types=["echo", "emails.send"])
    kinds = [item["kind"] for item in items]
    # 7 streams and 12 buckets; the masters' 9 durables (one per priority among them), the projector's,
    # a scheduler's per region and priority, a WORK durable per region, priority and type.
    assert kinds.count("Stream") == 7 + 12 and kinds.count("Consumer") == 9 + 1 + 2 * 3 + 2 * 3 * 2
    for item in items:
        assert item["apiVersion"] == "jetstream.nats.io/v1beta2"
        assert jsonschema.Draft7Validator.check_schema(schemas[item["kind"]]) is None
        jsonschema.validate(item["spec"], schemas[item["kind"]])
        assert jsonschema.Draft7Validator({"pattern": K8S_NAME, "maxLength": 253}).is_valid(item["metadata"]["name"])
        assert item["metadata"]["namespace"] == "jobs"


def test_the_strict_schema_refuses_a_field_nack_does_not_know() -> None:
    schema = spec_schemas()["Stream"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "X", "allowBatched": True}, schema)


def test_a_field_without_a_nack_spelling_is_an_error_not_left_out() -> None:
    with pytest.raises(ValueError, match="allow_batched"):
        nack.spec({"name": "X", "allow_batched": True}, nack.STREAM_FIELDS)


def test_durations_are_go_durations_in_their_largest_whole_unit() -> None:
    durations = (604_800 * 10**9, 120 * 10**9, 30 * 10**9, 1_500_000_000, 1, 0)
    assert [nack.go_duration(ns) for ns in durations] == ["168h", "2m", "30s", "1500ms", "1ns", "0s"]


def test_specs_say_what_the_definitions_say() -> None:
    items = {(item["kind"], item["spec"].get("name") or item["spec"]["durableName"]): item["spec"] for item in nack.resources(Settings(replicas=3))}
    tasks = items[("Stream", subjects.TASKS_STREAM)]
    assert (tasks["maxAge"], tasks["replicas"], tasks["discard"], tasks["retention"]) == ("168h", 3, "new", "limits")
    ingress = [subjects.SUBMIT, *map(subjects.submit, Settings().priorities)]
    assert tasks["subjects"] == [*ingress, subjects.REJECTED, subjects.CANCEL, subjects.REPRIORITIZE]
    workers = items[("Stream", f"KV_{subjects.WORKERS_BUCKET}")]
    assert (workers["maxAge"], workers["storage"], workers["subjectDeleteMarkerTtl"], workers["allowMsgTtl"]) == ("6s", "file", "1s", True)
    assert items[("Stream", f"KV_{subjects.IDEMPOTENCY_BUCKET}")]["allowMsgTtl"] is True  # per-key TTLs
    projector = items[("Consumer", subjects.PROJECTOR_CONSUMER)]
    assert (projector["streamName"], projector["ackWait"], projector["maxDeliver"]) == (subjects.EVENTS_STREAM, "30s", -1)


def test_the_committed_kubernetes_streams_are_the_commands_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendered with the Kubernetes manifests' settings (their ConfigMap: regions, replicas)
    and the types their workers load, so that the WORK durables KEDA reads exist from the start."""
    without_streamsched_env(monkeypatch)
    (configmap,) = [d for d in yaml.safe_load_all((KUBERNETES / "settings.yaml").read_text()) if d and d["kind"] == "ConfigMap"]
    for name, value in configmap["data"].items():
        if name.startswith("STREAMSCHED_"):
            monkeypatch.setenv(name, value)
    types = ",".join(Registry.from_modules(["workers.examples"]).names())
    result = CliRunner().invoke(app, ["streams", "render", "--format", "nack", "--types", types])
    assert result.exit_code == 0, result.output
    committed = (KUBERNETES / "streams.yaml").read_text()
    command = f"STREAMSCHED_REGIONS={configmap['data']['STREAMSCHED_REGIONS']} STREAMSCHED_REPLICAS={configmap['data']['STREAMSCHED_REPLICAS']} "
    command += f"streamsched streams render --format nack --types {types} > deploy/kubernetes/streams.yaml"
    assert result.output == committed, f"deploy/kubernetes/streams.yaml is stale: write it again with\n{command}"


def test_the_json_format_prints_the_api_shapes_filled_in(monkeypatch: pytest.MonkeyPatch) -> None:
    without_streamsched_env(monkeypatch)
    result = CliRunner().invoke(app, ["streams", "render", "--format", "json", "--regions", "us,eu", "--types", "echo", "--replicas", "2"])
    assert result.exit_code == 0, result.output
    shapes = json.loads(result.output)
    assert {stream["num_replicas"] for stream in shapes["streams"]} == {kv["replicas"] for kv in shapes["kv"]} == {2}
    assert {stream["name"] for stream in shapes["streams"]} >= {subjects.TASKS_STREAM, subjects.WORK_STREAM}
    durables = {consumer["config"]["durable_name"] for consumer in shapes["consumers"]}
    assert {subjects.sched_consumer("eu", "low"), subjects.work_consumer("us", "high", "echo")} <= durables
    assert next(kv for kv in shapes["kv"] if kv["bucket"] == subjects.STATE_BUCKET)["ttl"] == 7 * 24 * 3600 * 10**9
