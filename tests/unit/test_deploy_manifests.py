"""The files under deploy/ parse, and keep what surviving node and head loss needs (deploy/README.md §6):
GCS fault tolerance with a Redis password from a Secret, faster GCS health checks on the head, a Redis
example reachable only inside the cluster, shards listening on the node address, one image everywhere."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from shardstate.shards.actor import WIRE_HOST_ENV

yaml = pytest.importorskip("yaml")

pytestmark = pytest.mark.timeout(30)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
IMAGE = "REGISTRY/shardstate:0.1.0"
HEALTH_CHECKS = (
    "RAY_health_check_initial_delay_ms",
    "RAY_health_check_period_ms",
    "RAY_health_check_timeout_ms",
    "RAY_health_check_failure_threshold",
)
#: what Ray 2.60 does by default (src/ray/common/ray_config_def.h)
RAY_DEFAULT_PERIOD_MS, RAY_DEFAULT_TIMEOUT_MS = 3000, 10000
RAY_MANIFESTS = ("kuberay/raycluster.yaml", "kuberay/job.yaml")
YAML_FILES = sorted(str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*.yaml"))

Doc = dict[str, Any]


def load(name: str) -> list[Doc]:
    """Every YAML document of ``deploy/<name>``."""
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc is not None]


def ray_cluster_spec(name: str) -> Doc:
    """The RayCluster spec of a KubeRay manifest (a RayJob carries one as ``rayClusterSpec``)."""
    (doc,) = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    if doc["kind"] == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    assert doc["kind"] == "RayCluster"
    return doc["spec"]


def pod_templates(spec: Doc) -> list[Doc]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def head_container(spec: Doc) -> Doc:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def env_of(container: Doc) -> dict[str, Doc]:
    return {var["name"]: var for var in container.get("env", [])}


def redis_example() -> dict[str, Doc]:
    """The documents of kuberay/redis.yaml by kind (one of each)."""
    docs = load("kuberay/redis.yaml")
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs)
    return by_kind


def redis_container() -> Doc:
    (container,) = redis_example()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def launcher() -> Doc:
    (doc,) = load("ray-cluster.yaml")
    return doc


def launcher_head_line() -> str:
    (line,) = [cmd for cmd in launcher()["head_start_ray_commands"] if "ray start --head" in cmd]
    return line


def health_checks_of_launcher() -> dict[str, str]:
    return dict(re.findall(r"\b(RAY_health_check_\w+)=(\S+)", launcher_head_line()))


def test_the_deployment_files_are_there() -> None:
    assert {"ray-cluster.yaml", "kuberay/raycluster.yaml", "kuberay/job.yaml", "kuberay/redis.yaml"} <= set(
        YAML_FILES
    )


@pytest.mark.parametrize("name", YAML_FILES)
def test_every_yaml_file_parses_into_mappings(name: str) -> None:
    docs = load(name)
    assert docs
    assert all(isinstance(doc, dict) and doc for doc in docs)


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_the_gcs_is_kept_in_the_example_redis_with_a_password_from_a_secret(name: str) -> None:
    options = ray_cluster_spec(name)["gcsFaultToleranceOptions"]
    assert options.get("backend", "redis") == "redis"
    service = redis_example()["Service"]
    host, _, port = options["redisAddress"].partition(":")
    assert host == service["metadata"]["name"]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    password = options["redisPassword"]
    assert "value" not in password  # never a password in the manifest
    ref = password["valueFrom"]["secretKeyRef"]
    assert ref["name"]
    assert ref["key"]
    assert not ref.get("optional", False)
    # the Redis example demands the same Secret's password
    assert env_of(redis_container())["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_nothing_kuberay_rejects_next_to_gcs_fault_tolerance(name: str) -> None:
    spec = ray_cluster_spec(name)
    params = spec["headGroupSpec"]["rayStartParams"]
    assert "redis-password" not in params
    assert "redis-username" not in params
    assert not {"REDIS_PASSWORD", "REDIS_USERNAME", "RAY_REDIS_ADDRESS"} & set(env_of(head_container(spec)))
    assert "ray.io/external-storage-namespace" not in spec["headGroupSpec"]["template"]["metadata"].get(
        "annotations", {}
    )


def test_the_two_ray_clusters_never_share_a_storage_namespace_in_redis() -> None:
    namespaces = [
        ray_cluster_spec(name)["gcsFaultToleranceOptions"].get("externalStorageNamespace")
        for name in RAY_MANIFESTS
    ]
    # unset: KubeRay uses each RayCluster's UID; set: they must differ
    assert namespaces == [None, None] or len(set(namespaces)) == len(namespaces)


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_the_head_runs_faster_gcs_health_checks(name: str) -> None:
    env = env_of(head_container(ray_cluster_spec(name)))
    values = {key: int(env[key]["value"]) for key in HEALTH_CHECKS}
    assert all(value > 0 for value in values.values())
    assert values["RAY_health_check_period_ms"] < RAY_DEFAULT_PERIOD_MS
    assert values["RAY_health_check_timeout_ms"] < RAY_DEFAULT_TIMEOUT_MS
    # a silent node is declared dead after about threshold x (period + timeout): faster than Ray's
    # default (~65 s), not so fast that a short stall removes a healthy node for good
    silent = values["RAY_health_check_failure_threshold"] * (
        values["RAY_health_check_period_ms"] + values["RAY_health_check_timeout_ms"]
    )
    assert 5000 <= silent <= 20000


def test_all_deployments_use_the_same_health_check_settings() -> None:
    kuberay = [
        {key: env_of(head_container(ray_cluster_spec(name)))[key]["value"] for key in HEALTH_CHECKS}
        for name in RAY_MANIFESTS
    ]
    assert kuberay[0] == kuberay[1] == health_checks_of_launcher()


def test_the_launcher_sets_health_checks_and_offers_gcs_fault_tolerance_as_an_option() -> None:
    assert set(health_checks_of_launcher()) == set(HEALTH_CHECKS)
    assert "RAY_REDIS_ADDRESS" not in launcher_head_line()  # needs the user's Redis: commented out
    text = (DEPLOY / "ray-cluster.yaml").read_text()
    commented = [line.lstrip()[1:] for line in text.splitlines() if line.lstrip().startswith("#")]
    ft_head = [line for line in commented if "ray start --head" in line and "RAY_REDIS_ADDRESS=" in line]
    assert len(ft_head) == 1
    assert "RAY_external_storage_namespace=" in ft_head[0]
    assert '--redis-password="$(cat ~/.ray/redis_password)"' in ft_head[0]
    assert dict(re.findall(r"\b(RAY_health_check_\w+)=(\S+)", ft_head[0])) == health_checks_of_launcher()
    ft_worker = [line for line in commented if "ray start --address" in line]
    assert any("RAY_gcs_rpc_server_reconnect_timeout_s=" in line for line in ft_worker)


def test_the_redis_example_is_reachable_only_inside_the_cluster() -> None:
    redis = redis_example()
    service = redis["Service"]["spec"]
    assert service["type"] == "ClusterIP"
    assert not {"externalIPs", "loadBalancerIP", "externalName"} & set(service)
    assert all("nodePort" not in port for port in service["ports"])
    pod = redis["Deployment"]["spec"]["template"]
    assert not pod["spec"].get("hostNetwork", False)
    assert all("hostPort" not in port for port in redis_container().get("ports", []))
    labels = pod["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    policy = redis["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}  # no ipBlock / namespaceSelector: same namespace, chosen pods
    assert [p["port"] for p in rule["ports"]] == [6379]
    (node_type,) = [e for e in source["podSelector"]["matchExpressions"] if e["key"] == "ray.io/node-type"]
    assert node_type["operator"] == "In"
    assert set(node_type["values"]) == {"head", "redis-cleanup"}  # KubeRay's cleanup Job needs Redis too
    for name in RAY_MANIFESTS:
        head_labels = ray_cluster_spec(name)["headGroupSpec"]["template"]["metadata"]["labels"]
        assert source["podSelector"]["matchLabels"].items() <= head_labels.items()


def test_the_redis_example_requires_the_password() -> None:
    container = redis_container()
    args = container["args"]
    assert container["command"] == ["redis-server"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    password = env_of(container)["REDIS_PASSWORD"]
    assert "value" not in password
    assert password["valueFrom"]["secretKeyRef"]["name"]


def test_every_ray_container_runs_the_same_image_placeholder() -> None:
    images = {launcher()["docker"]["image"]}
    for name in RAY_MANIFESTS:
        for template in pod_templates(ray_cluster_spec(name)):
            images |= {container["image"] for container in template["spec"]["containers"]}
    assert images == {IMAGE}
    version = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', (DEPLOY / "Dockerfile").read_text())
    assert version is not None
    assert IMAGE.endswith(f":{version.group(1)}")
    assert IMAGE in (DEPLOY / "README.md").read_text()


def test_shards_listen_on_the_node_address_everywhere() -> None:
    for name in RAY_MANIFESTS:
        for template in pod_templates(ray_cluster_spec(name)):
            (ray_container,) = [c for c in template["spec"]["containers"] if c["image"] == IMAGE]
            assert env_of(ray_container)[WIRE_HOST_ENV]["value"] == "node"
    assert f"--env {WIRE_HOST_ENV}=node" in launcher()["docker"]["run_options"]


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_every_ray_pod_keeps_shard_files_on_a_volume(name: str) -> None:
    for template in pod_templates(ray_cluster_spec(name)):
        (container,) = template["spec"]["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/home/ray/.shardstate"]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert "ephemeral" in volumes[mount["name"]] or "persistentVolumeClaim" in volumes[mount["name"]]
