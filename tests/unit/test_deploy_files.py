"""deploy/: the Prometheus scrape config and the Grafana dashboard are valid, scrape the ports
`up --metrics-port-base` gives, and query the jobs the config names; and `up` gives each role
process a port of its own."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from streamsched.config import Settings
from streamsched.up import DEFAULT_API_PORT, UpOptions, last_metrics_port, metrics_port, roles

DEPLOY = Path(__file__).parents[2] / "deploy"
#: A metric name in a PromQL expression: the dashboard writes every selector with braces.
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}")


def scrape_jobs() -> dict[str, list[str]]:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    return {job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]] for job in config["scrape_configs"]}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "streamsched.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def queried(job_pattern: str) -> set[str]:
    """The metric names the dashboard reads from the jobs a selector matches with ``job_pattern``."""
    return {name for expr in dashboard_queries() for name, labels in SELECTOR.findall(expr) if job_pattern in labels}


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
