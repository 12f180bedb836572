"""The Kubernetes manifests in deploy/kubernetes, checked offline: every object against the Kubernetes
schemas (kubernetes-validate ships them; strict, so a misspelt field fails), and every reference
between the objects, to the image and to the server itself."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from rerank_server.app import LIVENESS_SERVICE, SERVICE_NAME
from rerank_server.metrics import Metrics
from rerank_server.settings import ServerSettings
from rerank_server.transport.shm import SegmentLayout
from rerank_server.workers.pool import SEGMENTS_PER_REPLICA, STOP_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
VARIANTS = ("gpu", "cpu")
KINDS = {
    "ConfigMap",
    "PersistentVolumeClaim",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
}
# The oldest Kubernetes the manifests are written for, and the newest whose schemas the package ships.
SCHEMA_VERSIONS = ("1.31", kubernetes_validate.latest_version())
ENV_PREFIX = "RERANK_"
# Where the two variants are meant to differ; anything else must be the same in both.
INTENDED_DIFFERENCES = {
    ("ConfigMap", "data", "RERANK_DEVICES"),
    ("ConfigMap", "data", "RERANK_MAX_BATCH_TOKENS"),
    ("ConfigMap", "data", "RERANK_CPU_REPLICAS"),
    ("ConfigMap", "data", "RERANK_THREADS_PER_REPLICA"),
    ("Deployment", "spec", "template", "spec", "tolerations"),
    ("Deployment", "spec", "template", "spec", "containers", "0", "image"),
    ("Deployment", "spec", "template", "spec", "containers", "0", "resources"),
}

Object = dict[str, Any]


def load(path: Path) -> list[Object]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def manifests(variant: str) -> dict[str, Object]:
    """A variant's objects by kind (one of each)."""
    objects = [obj for path in sorted((KUBERNETES / variant).glob("*.yaml")) for obj in load(path)]
    by_kind = {obj["kind"]: obj for obj in objects}
    assert len(by_kind) == len(objects), f"{variant}: two objects of one kind"
    return by_kind


SECRETS = {secret["metadata"]["name"]: secret for secret in load(KUBERNETES / "secrets.example.yaml")}
ADAPTER = yaml.safe_load((KUBERNETES / "prometheus-adapter-rules.yaml").read_text())


def pod_spec(variant: str) -> Object:
    return manifests(variant)["Deployment"]["spec"]["template"]["spec"]


def container(variant: str) -> Object:
    (only,) = pod_spec(variant)["containers"]
    return only


def config(variant: str) -> dict[str, str]:
    return manifests(variant)["ConfigMap"]["data"]


def commented_settings(variant: str) -> dict[str, str]:
    """Settings the ConfigMap holds commented out, for users to turn on (TLS)."""
    text = (KUBERNETES / variant / "configmap.yaml").read_text()
    return dict(re.findall(rf"^\s*#\s*({ENV_PREFIX}\w+):\s*(\S+)\s*$", text, re.MULTILINE))


@pytest.fixture
def settings_of(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, str]], ServerSettings]:
    """ServerSettings as the server builds them from these environment variables, and no others."""

    def build(environment: dict[str, str]) -> ServerSettings:
        for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
            monkeypatch.delenv(name)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        return ServerSettings.from_args([])

    return build


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity such as 64Mi or 2G, in bytes."""
    match = re.fullmatch(r"(\d+)(?:([KMGT])(i?))?", quantity)
    assert match, quantity
    number, prefix, binary = match.groups()
    return int(number) * ((1024 if binary else 1000) ** "_KMGT".index(prefix) if prefix else 1)


def leaves(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every scalar of a YAML tree, with the keys and list indexes that lead to it."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, (*path, str(index)))
    else:
        yield path, value


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_is_valid_kubernetes(variant: str, version: str) -> None:
    objects = manifests(variant)
    assert set(objects) == KINDS
    for obj in [*objects.values(), *SECRETS.values()]:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_catches_a_misspelt_field() -> None:
    deployment = manifests("gpu")["Deployment"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[0], strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_pdb_and_autoscaler_point_at_the_deployment(variant: str) -> None:
    objects = manifests(variant)
    deployment = objects["Deployment"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    service = objects["Service"]["spec"]
    assert service["selector"] == selector
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    # No replicas field: every kubectl apply would reset the autoscaler's count to it.
    assert "replicas" not in deployment["spec"]
    # Headless, so the name resolves to every ready pod and clients balance per call.
    assert service["clusterIP"] == "None" and not service.get("publishNotReadyAddresses", False)
    ports = {port["name"]: port for port in container(variant)["ports"]}
    for port in service["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]["containerPort"]
        assert port["appProtocol"]
    assert {"grpc", "http"} <= {port["name"] for port in service["ports"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_and_probes_are_the_servers(
    variant: str, settings_of: Callable[[dict[str, str]], ServerSettings]
) -> None:
    settings = settings_of(config(variant))
    ports = {port["name"]: port["containerPort"] for port in container(variant)["ports"]}
    assert ports == {"grpc": settings.port, "http": settings.http_port, "metrics": settings.metrics_port}
    # The HTTP API is on, at the port the image exposes and the docs name (the server's default).
    assert settings.http_port == ServerSettings.model_fields["http_port"].default > 0
    probes = {
        kind: container(variant)[f"{kind}Probe"]["grpc"] for kind in ("startup", "readiness", "liveness")
    }
    assert {probe["port"] for probe in probes.values()} == {settings.port}  # kubelet takes no port name
    # Ready only while every model has a ready replica; alive whenever the process answers.
    assert probes["startup"]["service"] == probes["readiness"]["service"] == SERVICE_NAME
    assert probes["liveness"]["service"] == LIVENESS_SERVICE
    # kubelet's grpc probes speak plaintext only: TLS on the port needs exec probes instead.
    assert not settings.tls_cert


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_startup_budget_covers_a_first_download_and_the_rollout_waits_for_it(variant: str) -> None:
    startup = container(variant)["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 600
    assert manifests(variant)["Deployment"]["spec"]["progressDeadlineSeconds"] > budget


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_keys_are_real_server_settings(
    variant: str, settings_of: Callable[[dict[str, str]], ServerSettings]
) -> None:
    for name in [*config(variant), *commented_settings(variant)]:
        assert name.startswith(ENV_PREFIX) and name.isupper(), name
        assert name.removeprefix(ENV_PREFIX).lower() in ServerSettings.model_fields, name
    settings = settings_of({**config(variant), **commented_settings(variant)})  # the values parse
    assert settings.models() and settings.log_format == "json"
    # Settings come from the ConfigMap alone, not from the Deployment's own env.
    assert not [
        env["name"] for env in container(variant).get("env", []) if env["name"].startswith(ENV_PREFIX)
    ]
    assert container(variant)["envFrom"] == [
        {"configMapRef": {"name": manifests(variant)["ConfigMap"]["metadata"]["name"]}}
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_mounted_secrets_hold_the_files_the_settings_name(variant: str) -> None:
    volumes = {volume["name"]: volume for volume in pod_spec(variant)["volumes"]}
    files: dict[str, str] = {}  # path in the container -> the Secret key behind it
    for mount in container(variant)["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        keys = set(SECRETS[secret["secretName"]]["stringData"])
        items = secret.get("items") or [{"key": key, "path": key} for key in sorted(keys)]
        for item in items:
            assert item["key"] in keys, (secret["secretName"], item["key"])
            files[f"{mount['mountPath']}/{item['path']}"] = item["key"]
        assert mount.get("readOnly") is True
    paths = {**config(variant), **commented_settings(variant)}
    named = {name: path for name, path in paths.items() if path.startswith("/etc/rerank/")}
    assert {"RERANK_AUTH_TOKENS_FILE", "RERANK_TLS_CERT", "RERANK_TLS_KEY"} <= set(named)
    for name, path in named.items():
        assert path in files, (name, path)


def test_the_documented_kubectl_commands_create_the_secrets_the_pods_mount() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text().replace("\\\n", " ")
    created: dict[str, set[str]] = {}
    for name, arguments in re.findall(r"kubectl .*?create secret generic ([\w-]+)([^\n]*)", text):
        created.setdefault(name, set()).update(re.findall(r"--from-(?:file|literal)=([\w.-]+)=", arguments))
    assert created == {name: set(secret["stringData"]) for name, secret in SECRETS.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_volumes_are_declared_mounted_and_where_the_image_expects_them(variant: str) -> None:
    spec = pod_spec(variant)
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container(variant)["volumeMounts"]}
    assert set(mounts.values()) == set(volumes)  # each mount names a volume, each volume is mounted
    dockerfile = (ROOT / "Dockerfile").read_text()
    cache = re.search(r"HF_HOME=(\S+)", dockerfile)[1]
    claim = volumes[mounts[cache]]["persistentVolumeClaim"]["claimName"]
    assert claim == manifests(variant)["PersistentVolumeClaim"]["metadata"]["name"]
    # The root filesystem is read-only: torch and Python need a writable /tmp.
    assert container(variant)["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_dev_shm_holds_every_workers_batch_segments(
    variant: str, settings_of: Callable[[dict[str, str]], ServerSettings]
) -> None:
    settings = settings_of(config(variant))
    volumes = {volume["name"]: volume for volume in pod_spec(variant)["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container(variant)["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    limits = container(variant)["resources"]["limits"]
    replicas = int(limits["nvidia.com/gpu"]) if "nvidia.com/gpu" in limits else settings.cpu_replicas
    # The largest layout any family has: a token-type column and a per-row cutoff layer.
    widest = SegmentLayout(
        settings.max_batch_tokens, settings.max_batch_size, ("input_ids", "token_type_ids"), ("cutoff_layer",)
    )
    needed = len(settings.models()) * replicas * SEGMENTS_PER_REPLICA * widest.size
    assert quantity_bytes(shm["sizeLimit"]) >= 10 * needed
    assert quantity_bytes(shm["sizeLimit"]) <= quantity_bytes(limits["memory"]) // 16  # counted in it


@pytest.mark.parametrize("variant", VARIANTS)
def test_termination_waits_for_the_drain_and_the_workers(
    variant: str, settings_of: Callable[[dict[str, str]], ServerSettings]
) -> None:
    settings = settings_of(config(variant))
    grace = pod_spec(variant)["terminationGracePeriodSeconds"]
    assert grace > settings.grace_period_s + STOP_TIMEOUT_S
    assert settings.max_connection_age_s > 0  # clients re-resolve the Service and find new pods


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_pod_runs_unprivileged_as_the_images_user(variant: str) -> None:
    pod = pod_spec(variant)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert f"USER {pod['runAsUser']}:{pod['runAsGroup']}" in (ROOT / "Dockerfile").read_text()
    assert pod["fsGroup"] == pod["runAsGroup"]
    box = container(variant)["securityContext"]
    assert box["allowPrivilegeEscalation"] is False and box.get("privileged", False) is False
    assert box["capabilities"]["drop"] == ["ALL"] and "add" not in box["capabilities"]


def test_the_gpu_pod_takes_one_gpu_and_refuses_to_run_without(
    settings_of: Callable[[dict[str, str]], ServerSettings],
) -> None:
    limits = container("gpu")["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec("gpu")[
        "tolerations"
    ]
    assert settings_of(config("gpu")).devices == "cuda"  # no GPU visible: exit at start, not serve on CPU


def test_the_cpu_pod_has_the_cores_its_workers_and_front_end_use(
    settings_of: Callable[[dict[str, str]], ServerSettings],
) -> None:
    settings = settings_of(config("cpu"))
    resources = container("cpu")["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed: whole cores, no throttling surprise
    assert "nvidia.com/gpu" not in resources["limits"] and "tolerations" not in pod_spec("cpu")
    assert settings.devices == "cpu" and settings.threads_per_replica > 0
    used = settings.cpu_replicas * settings.threads_per_replica + settings.tokenizer_threads
    assert used <= int(resources["limits"]["cpu"])


def exported_series() -> dict[str, set[str]]:
    """The per-model series the server exports for one served model (as app.py registers a model's
    metrics), with their label names."""
    metrics = Metrics()
    metrics.watch_queue("m", lambda: 1.0, lambda: 1.0)
    metrics.for_model("m")
    return {
        sample.name: set(sample.labels) for family in metrics.registry.collect() for sample in family.samples
    }


def test_the_autoscaler_scales_on_series_the_server_exports() -> None:
    series = exported_series()
    rules = {rule["name"]["as"]: rule for rule in ADAPTER["rules"]["custom"]}
    for rule in rules.values():
        (source,) = re.findall(r"^(\w+)\{", rule["seriesQuery"])
        assert re.fullmatch(rule["name"]["matches"], source)
        queried = set(re.findall(r"\b(rerank_\w+)\b", rule["metricsQuery"]))
        for name in {source} | queried:
            assert name in series, name
            assert "model" in series[name], name  # per model; the rule sums over a pod's models
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "by (<<.GroupBy>>)" in rule["metricsQuery"]
    assert "rerank_queued_work_seconds" in rules  # the server's own autoscaling signal, as it is named
    for variant in VARIANTS:
        spec = manifests(variant)["HorizontalPodAutoscaler"]["spec"]
        assert {metric["type"] for metric in spec["metrics"]} == {"Pods"}
        assert {metric["pods"]["metric"]["name"] for metric in spec["metrics"]} == set(rules)


@pytest.mark.parametrize("variant", VARIANTS)
def test_scaling_down_is_slow_and_a_disruption_leaves_a_pod_serving(variant: str) -> None:
    objects = manifests(variant)
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert hpa["behavior"]["scaleUp"].get("stabilizationWindowSeconds", 0) == 0
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] < hpa["minReplicas"]
    rollout = objects["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0  # an old pod leaves only once its successor is ready


@pytest.mark.parametrize("variant", VARIANTS)
def test_prometheus_scrapes_the_metrics_port(
    variant: str, settings_of: Callable[[dict[str, str]], ServerSettings]
) -> None:
    annotations = manifests(variant)["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    settings = settings_of(config(variant))
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(settings.metrics_port),
        "prometheus.io/path": "/metrics",
    }
    assert settings.metrics_host == "0.0.0.0"


def test_the_variants_differ_only_where_intended() -> None:
    gpu, cpu = manifests("gpu"), manifests("cpu")
    differing = set()
    for kind in KINDS:
        left, right = dict(leaves(gpu[kind])), dict(leaves(cpu[kind]))
        differing |= {
            (kind, *path) for path in left.keys() | right.keys() if left.get(path) != right.get(path)
        }
    intended = {path for path in differing if any(path[: len(p)] == p for p in INTENDED_DIFFERENCES)}
    assert differing == intended, sorted(differing - intended)
    for prefix in INTENDED_DIFFERENCES:  # and each intended difference is really there
        assert any(path[: len(prefix)] == prefix for path in differing), prefix
