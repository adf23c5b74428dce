"""deploy/kubernetes/: every manifest is valid against the Kubernetes schemas (KEDA's
ScaledObject against its CRD's schema, vendored in tests/fixtures/), offline, and the manifests
agree with each other and with the code: probes on ports the containers expose, a
PodDisruptionBudget per Deployment, the settings loadable, the NATS users those of
`access`, and the KEDA triggers naming the WORK consumers the workers create."""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from streamsched import access, subjects
from streamsched.config import Settings
from streamsched.registry import Registry

KUBERNETES = Path(__file__).parents[2] / "deploy" / "kubernetes"
KEDA_SCHEMA = Path(__file__).parents[1] / "fixtures" / "keda-scaledobject-v1alpha1.schema.yaml"
#: Files of deploy/kubernetes that are not Kubernetes objects.
NOT_MANIFESTS = {"kustomization.yaml", "nats-values.yaml"}
#: Manifests kustomization.yaml leaves out: the Job is the alternative to NACK's streams.yaml.
APPLIED_BY_HAND = {"streams-apply-job.yaml", "streams.yaml"}
#: Secrets the operator makes (README.md there) that a pod cannot start without.
REQUIRED_SECRETS = {"streamsched-api"}
#: The commands a role Deployment runs: they serve /health and /ready on the metrics port.
ROLE_COMMANDS = {"master", "regional", "worker", "projector"}


def manifest_files() -> list[Path]:
    return sorted(path for path in KUBERNETES.glob("*.yaml") if path.name not in NOT_MANIFESTS)


@functools.cache
def objects() -> tuple[tuple[Path, dict[str, Any]], ...]:
    """Every object of the manifests with its file, read once (a test that changes one copies it)."""
    return tuple((path, document) for path in manifest_files() for document in yaml.safe_load_all(path.read_text()) if document is not None)


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in objects() if document["kind"] == kind]


def settings_of_configmap() -> Settings:
    (configmap,) = of_kind("ConfigMap")
    return Settings.load(configmap["data"])


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def strict(schema: Any) -> Any:
    """``schema`` refusing properties it does not name, as ``kubernetes-validate --strict``
    does: the API server would silently drop a misspelt field of a custom resource."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


def test_every_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    version = kubernetes_validate.latest_version()
    keda = jsonschema.Draft7Validator(strict(yaml.safe_load(KEDA_SCHEMA.read_text())))
    checked = []
    for path, document in objects():
        if document["apiVersion"].startswith("jetstream.nats.io/"):
            continue  # NACK's resources: test_nack_render.py checks them against NACK's CRDs
        if document["apiVersion"] == "keda.sh/v1alpha1":
            errors = [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in keda.iter_errors(document)]
            assert errors == [], f"{path.name} {document['metadata']['name']}"
        else:
            kubernetes_validate.validate(document, version, strict=True)  # raises, naming the field
        checked.append(document["kind"])
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ScaledObject", "Job"} <= set(checked)


def test_the_validation_catches_a_misspelt_field() -> None:
    (deployment, *_) = of_kind("Deployment")
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = wrong["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, kubernetes_validate.latest_version(), strict=True)
    (scaled, *_) = of_kind("ScaledObject")
    misspelt = copy.deepcopy(scaled)
    misspelt["spec"]["maxReplicas"] = misspelt["spec"].pop("maxReplicaCount")
    keda = jsonschema.Draft7Validator(strict(yaml.safe_load(KEDA_SCHEMA.read_text())))
    assert not keda.is_valid(misspelt)


def test_the_kustomization_takes_every_manifest_but_the_streams() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "streamsched"
    assert set(kustomization["resources"]) == {path.name for path in manifest_files()} - APPLIED_BY_HAND
    assert {image["name"] for image in kustomization["images"]} == {container(d)["image"] for d in of_kind("Deployment")}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its kustomize) is not installed")
def test_kustomize_renders_every_object_into_the_namespace_with_the_image_set() -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(KUBERNETES)], capture_output=True, text=True, check=True).stdout
    documents = [document for document in yaml.safe_load_all(rendered) if document]
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert len(documents) == sum(1 for path, _ in objects() if path.name not in APPLIED_BY_HAND)
    for document in documents:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "streamsched", document["metadata"]["name"]
        if document["kind"] == "Deployment":
            assert container(document)["image"] == f"{image['newName']}:{image['newTag']}"


def test_every_deployment_probes_a_port_it_exposes_and_runs_as_a_user() -> None:
    settings = settings_of_configmap()
    for deployment in of_kind("Deployment"):
        name, spec = deployment["metadata"]["name"], container(deployment)
        ports = {port["name"]: port["containerPort"] for port in spec["ports"]}
        probes = {probe: spec[probe]["httpGet"] for probe in ("livenessProbe", "readinessProbe")}
        assert {get["path"] for get in probes.values()} == {"/health", "/ready"}, name
        for get in probes.values():
            assert get["port"] in ports or get["port"] in ports.values(), f"{name} probes port {get['port']}, exposes {ports}"
        if spec["args"][0] in ROLE_COMMANDS:  # a role's probes are on its metrics port
            assert {ports.get(get["port"], get["port"]) for get in probes.values()} == {settings.metrics_port}, name
            assert settings.metrics_host == "0.0.0.0"  # the kubelet probes the pod's address
        else:
            assert spec["args"][:1] == ["api"] and ports["http"] == int(option(spec["args"], "--port")), name
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, name
        assert {"cpu", "memory"} <= set(spec["resources"]["requests"]) and "memory" in spec["resources"]["limits"], name


def test_a_disruption_budget_covers_each_deployment_and_nothing_else() -> None:
    deployments = of_kind("Deployment")
    for budget in of_kind("PodDisruptionBudget"):
        wanted = budget["spec"]["selector"]["matchLabels"].items()
        covered = [d["metadata"]["name"] for d in deployments if wanted <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert covered == [budget["metadata"]["name"]], f"{budget['metadata']['name']} selects {covered}"
    assert sorted(b["metadata"]["name"] for b in of_kind("PodDisruptionBudget")) == sorted(d["metadata"]["name"] for d in deployments)
    for deployment in deployments:  # a Deployment's selector picks its own pods only
        assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_the_api_service_reaches_the_api_pods() -> None:
    (service,) = of_kind("Service")
    (api,) = [d for d in of_kind("Deployment") if container(d)["args"][0] == "api"]
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= {port["name"] for port in container(api)["ports"]}


def test_settings_and_credentials_come_from_the_configmap_and_secrets_the_roles_know() -> None:
    settings = settings_of_configmap()  # loads: every STREAMSCHED_* is a setting
    assert settings.replicas == 3
    users = set(access.grants(settings))
    (configmap,) = of_kind("ConfigMap")
    for _, document in objects():
        if document["kind"] not in ("Deployment", "Job"):
            continue
        spec = document["spec"]["template"]["spec"]["containers"][0]
        assert "env" not in spec, "settings come from the ConfigMap and Secrets, credentials never from a manifest"
        references = spec["envFrom"]
        assert references[0]["configMapRef"]["name"] == configmap["metadata"]["name"]
        for secret in (ref["secretRef"] for ref in references[1:]):
            assert secret.get("optional") is True or secret["name"] in REQUIRED_SECRETS, secret
            user = secret["name"].removeprefix("streamsched-nats-")
            assert secret["name"] in REQUIRED_SECRETS or user in users, f"{secret['name']}: no NATS user {user} (streamsched access render)"
        args = spec["args"]
        if "--region" in args:
            assert option(args, "--region") in settings.regions


def test_each_region_s_workers_scale_on_the_work_consumers_they_create() -> None:
    settings = settings_of_configmap()
    deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    scaled = of_kind("ScaledObject")
    assert len(scaled) == len(settings.regions)
    for scaler in scaled:
        target = scaler["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        deployment = deployments[target["name"]]
        assert "replicas" not in deployment["spec"], "KEDA sets the replicas: a count here would fight it on every apply"
        args = container(deployment)["args"]
        assert args[0] == "worker"
        region, modules = option(args, "--region"), [arg for arg in args[1 : args.index("--region")] if not arg.startswith("-")]
        expected = {subjects.work_consumer(region, p, t) for p in settings.priorities for t in Registry.from_modules(modules).names()}
        triggers = scaler["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"nats-jetstream"}
        assert {t["metadata"]["stream"] for t in triggers} == {subjects.WORK_STREAM}
        consumers = sorted(t["metadata"]["consumer"] for t in triggers)
        assert consumers == sorted(expected), "the consumers of " + region + ":\n" + "\n".join(sorted(expected))
        assert scaler["spec"]["minReplicaCount"] >= 1  # a consumer exists once a worker made it


def test_the_nats_chart_values_make_the_cluster_the_manifests_name() -> None:
    values = yaml.safe_load((KUBERNETES / "nats-values.yaml").read_text())["config"]
    settings = settings_of_configmap()
    assert values["cluster"]["enabled"] and values["cluster"]["replicas"] == settings.replicas == 3
    assert values["jetstream"]["enabled"] and values["jetstream"]["fileStore"]["enabled"]
    assert values["jetstream"]["memoryStore"]["enabled"]  # KV workers and regions are memory streams
    assert re.fullmatch(r"nats://nats\.nats\.svc\.cluster\.local:4222", settings.nats_url)
    endpoints = {t["metadata"]["natsServerMonitoringEndpoint"] for s in of_kind("ScaledObject") for t in s["spec"]["triggers"]}
    assert endpoints == {f"nats-headless.nats.svc.cluster.local:{values['monitor']['port']}"}
    assert values["monitor"]["enabled"]
