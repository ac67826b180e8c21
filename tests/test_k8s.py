"""Kubernetes manifests and images, checked offline: render, validate, lint, invariants."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import generate_latest

from tokenwire.common.settings import specs
from tokenwire.edge.settings import EdgeSettings
from tokenwire.server.config import Settings
from tokenwire.server.telemetry.metrics import ServerMetrics

pytestmark = pytest.mark.compute

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ["cpu", "gpu", "ha"]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(BIN))
    if found is None:
        pytest.fail(f"{name} is missing: `make install` (PyPI) or the Debian image provides it")
    return found


def _render(overlay: str, k8s: Path = ROOT / "k8s") -> str:
    kubectl = _tool("kubectl")
    done = subprocess.run(
        [kubectl, "kustomize", str(k8s / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def _docs(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_render(overlay)) if d]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


# kustomize's configMapGenerator appends a hash of the content to the name.
HASHED_CONFIG = re.compile(r"tokenwire-config-[a-z0-9]{10}")


def _config_map(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return found


def _env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(_config_map(docs)["data"])


def _containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each Deployment's first container, by Deployment name."""
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
        for d in docs
        if d["kind"] == "Deployment"
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay: str, tmp_path: Path) -> None:
    """`kubectl kustomize` renders the overlay and kubernetes-validate --strict accepts it."""
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(_render(overlay))
    _validate_strictly(rendered)


def _validate_strictly(manifest: Path) -> None:
    done = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", str(manifest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_manifests_pass_yamllint() -> None:
    """Every YAML file under k8s/ is yamllint-clean."""
    done = subprocess.run(
        [_tool("yamllint"), "-c", str(ROOT / ".yamllint.yaml"), str(ROOT / "k8s")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout


def test_dockerfiles_pass_hadolint() -> None:
    """Both Dockerfiles are hadolint-clean (ignores carry their reason in .hadolint.yaml)."""
    done = subprocess.run(
        [
            _tool("hadolint"),
            "--config",
            str(ROOT / ".hadolint.yaml"),
            str(ROOT / "Dockerfile"),
            str(ROOT / "Dockerfile.cuda"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probe_ports_match_container_ports(overlay: str) -> None:
    """Every probe targets a port its container declares."""
    for deployment in (d for d in _docs(overlay) if d["kind"] == "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            declared = {p["containerPort"] for p in c["ports"]} | {p["name"] for p in c["ports"]}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    handler = c[probe]
                    action = handler.get("grpc") or handler.get("httpGet") or handler["tcpSocket"]
                    assert action["port"] in declared, (deployment["metadata"]["name"], probe)


def _grace_and_stop(docs: list[dict[str, Any]], deployment: str) -> tuple[float, float]:
    """A Deployment's terminationGracePeriodSeconds, and the longest its pods' stop may take
    before the process exits: the preStop sleep, then (both the server and the edge) the drain
    notice (TOKENWIRE_DRAIN_NOTICE_S, 0 where the manifests leave it unset) and the drain
    grace (TOKENWIRE_DRAIN_GRACE_S)."""
    spec = _find(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    container = spec["containers"][0]
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    own = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    env = {**_env(docs), **own}
    notice = float(env.get("TOKENWIRE_DRAIN_NOTICE_S", 0))
    drain = float(env["TOKENWIRE_DRAIN_GRACE_S"])
    return float(spec["terminationGracePeriodSeconds"]), pre_stop + notice + drain


@pytest.mark.parametrize("deployment", ["tokenwire-server", "tokenwire-edge"])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_prestop_and_drain(overlay: str, deployment: str) -> None:
    """terminationGracePeriodSeconds >= preStop sleep + TOKENWIRE_DRAIN_NOTICE_S +
    TOKENWIRE_DRAIN_GRACE_S (both drain)."""
    grace, stop = _grace_and_stop(_docs(overlay), deployment)
    assert grace >= stop


@pytest.mark.parametrize("deployment", ["tokenwire-server", "tokenwire-edge"])
def test_a_drain_notice_counts_against_the_grace_period(tmp_path: Path, deployment: str) -> None:
    """In a copy of k8s/ with TOKENWIRE_DRAIN_NOTICE_S=15, preStop (5 s) + notice + drain
    grace (30 s) is more than the 45 s grace period: the invariant above no longer holds."""
    copy = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", copy)
    env = copy / "base" / "config.env"
    env.write_text(env.read_text() + "TOKENWIRE_DRAIN_NOTICE_S=15\n")
    docs = [d for d in yaml.safe_load_all(_render("cpu", copy)) if d]
    grace, stop = _grace_and_stop(docs, deployment)
    assert (grace, stop) == (45, 50)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down_and_bounded(overlay: str) -> None:
    """Non-root, read-only root filesystem, no privilege escalation, and requests + limits."""
    for deployment in (d for d in _docs(overlay) if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_spread_over_nodes(overlay: str) -> None:
    """The server's and the edge's pods spread over nodes (hostname, skew 1, preferred, not
    required), each Deployment counting its own pods: its selector's labels."""
    for name in ("tokenwire-server", "tokenwire-edge"):
        deployment = _find(_docs(overlay), "Deployment", name)
        [spread] = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert (spread["topologyKey"], spread["maxSkew"]) == ("kubernetes.io/hostname", 1)
        assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
        assert spread["labelSelector"] == deployment["spec"]["selector"]


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_provider() -> None:
    """The GPU overlay requests nvidia.com/gpu, tolerates GPU taints and selects CUDA."""
    docs = _docs("gpu")
    pod = _find(docs, "Deployment", "tokenwire-server")["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert server["image"].endswith("-cuda")
    assert _env(docs)["TOKENWIRE_PROVIDER"] == "cuda"


def test_gpu_overlay_schedules_only_on_a_driver_cuda_13_runs_on() -> None:
    """The GPU server requires a node whose NVIDIA driver major version is 580 or more (CUDA
    13, which onnxruntime-gpu 1.31 is built for, does not load on an older one): every
    alternative term asks that of one of GPU feature discovery's driver labels, and both of
    them (the current and the older name) have a term."""
    pod = _find(_docs("gpu"), "Deployment", "tokenwire-server")["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    asked = [term["matchExpressions"] for term in terms["nodeSelectorTerms"]]
    assert [[(e["operator"], e["values"]) for e in term] for term in asked] == [
        [("Gt", ["579"])]
    ] * len(asked)
    assert {term[0]["key"] for term in asked} == {
        "nvidia.com/cuda.driver-version.major",
        "nvidia.com/cuda.driver.major",
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_edge_balances_over_the_headless_service(overlay: str) -> None:
    """The edge targets dns:/// of the headless Service, which has no cluster IP."""
    docs = _docs(overlay)
    target = _env(docs)["TOKENWIRE_GRPC_TARGET"]
    assert target.startswith("dns:///tokenwire-grpc-headless")
    assert _find(docs, "Service", "tokenwire-grpc-headless")["spec"]["clusterIP"] == "None"
    assert float(_env(docs)["TOKENWIRE_MAX_CONNECTION_AGE_S"]) > 0


TOKENWIRE = ("tokenwire-server", "tokenwire-edge")
IMAGES = {"tokenwire-server": "tokenwire-server", "tokenwire-edge": "tokenwire-edge"}
"""Deployment -> the image name its base manifest uses, which overlays set with `images:`."""
IMAGES["tokenwire-redis"] = "redis"  # k8s/redis, in the ha overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_set_through_kustomize_images(overlay: str) -> None:
    """The overlay's `images:` sets the server's and the edge's image (and Redis' where it runs
    one), and what renders is exactly what it says (no patch hard-codes an image)."""
    kustomization = yaml.safe_load(
        (ROOT / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text()
    )
    wanted = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization["images"]}
    rendered = {name: c["image"] for name, c in _containers(_docs(overlay)).items()}
    assert set(TOKENWIRE) <= set(rendered)
    assert rendered == {deployment: wanted[IMAGES[deployment]] for deployment in rendered}
    patches = (ROOT / "k8s" / "overlays" / overlay).glob("*.yaml")
    assert not [p.name for p in patches if "image:" in p.read_text()]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_map_name_is_hashed_and_referenced_by_both_deployments(overlay: str) -> None:
    """The ConfigMap is generated with a content hash in its name, and both Deployments read
    that very name, so a config change rolls their pods."""
    docs = _docs(overlay)
    name = _config_map(docs)["metadata"]["name"]
    assert HASHED_CONFIG.fullmatch(name)
    containers = _containers(docs)
    for deployment in TOKENWIRE:
        refs = [e["configMapRef"]["name"] for e in containers[deployment]["envFrom"][:1]]
        assert refs == [name], deployment


def test_a_config_change_renames_the_config_map(tmp_path: Path) -> None:
    """Changing one setting in a copy of k8s/ renders a ConfigMap with another name (the
    rollout trigger); the copy keeps the tracked files untouched."""
    copy = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", copy)
    env = copy / "base" / "config.env"
    env.write_text(env.read_text().replace("TOKENWIRE_MAX_QUEUE=64", "TOKENWIRE_MAX_QUEUE=65"))
    before = _config_map(_docs("cpu"))["metadata"]["name"]
    after = [d for d in yaml.safe_load_all(_render("cpu", copy)) if d]
    assert _config_map(after)["metadata"]["name"] != before
    assert _env(after)["TOKENWIRE_MAX_QUEUE"] == "65"


INFERENCE_POOL = ROOT / "k8s" / "examples" / "inference-pool.yaml"
# kubernetes-validate knows the built-in kinds only; the InferencePool (a CRD) is checked below.
CUSTOM_KINDS = {"InferencePool"}


def _example() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(INFERENCE_POOL.read_text()) if d]


def _epp_flags() -> dict[str, str]:
    epp = _find(_example(), "Deployment", "tokenwire-epp")
    args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    return dict(arg.removeprefix("--").split("=", 1) for arg in args)


def test_inference_pool_examples_built_in_objects_validate_strictly(tmp_path: Path) -> None:
    """The EPP's Deployment, Service and RBAC beside the InferencePool pass
    kubernetes-validate --strict."""
    built_in = tmp_path / "built-in.yaml"
    built_in.write_text(
        yaml.safe_dump_all([d for d in _example() if d["kind"] not in CUSTOM_KINDS])
    )
    _validate_strictly(built_in)


def test_inference_pool_selects_the_server_pods_on_their_grpc_port() -> None:
    """The InferencePool has the v1 required fields; its selector matches the server pods (and
    not the edge's), its port is their gRPC port over h2c, and its endpointPickerRef names the
    EPP Service and one of that Service's ports."""
    docs = _example()
    pool = _find(docs, "InferencePool", "tokenwire")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    spec = pool["spec"]
    assert {"selector", "targetPorts", "endpointPickerRef"} <= set(spec)
    rendered = _docs("cpu")
    server = _find(rendered, "Deployment", "tokenwire-server")["spec"]["template"]
    edge = _find(rendered, "Deployment", "tokenwire-edge")["spec"]["template"]
    wanted = spec["selector"]["matchLabels"].items()
    assert wanted <= server["metadata"]["labels"].items()
    assert not wanted <= edge["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in server["spec"]["containers"][0]["ports"]}
    assert [p["number"] for p in spec["targetPorts"]] == [ports["grpc"]]
    assert spec["appProtocol"] == "kubernetes.io/h2c"
    ref = spec["endpointPickerRef"]
    service = _find(docs, "Service", ref["name"])
    assert ref["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}
    assert ref["failureMode"] in {"FailOpen", "FailClose"}
    assert pool["metadata"]["namespace"] == service["metadata"]["namespace"] == "tokenwire"


def test_endpoint_picker_reads_metrics_the_server_exports() -> None:
    """The EPP's metric flags name the waiting, running and KV-cache gauges a server exports,
    on the server's metrics port, for this pool."""
    flags = _epp_flags()
    exposition = generate_latest(ServerMetrics().registry).decode()
    gauges = {
        flags[name]
        for name in (
            "total-queued-requests-metric",
            "total-running-requests-metric",
            "kv-cache-usage-percentage-metric",
        )
    }
    assert gauges == {
        "tokenwire_requests_waiting",
        "tokenwire_requests_running",
        "tokenwire_kv_cache_usage_ratio",
    }
    for gauge in gauges:
        assert f"# TYPE {gauge} gauge" in exposition
    server = _find(_docs("cpu"), "Deployment", "tokenwire-server")["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in server["containers"][0]["ports"]}
    assert int(flags["model-server-metrics-port"]) == ports["metrics"]
    assert (flags["pool-name"], flags["pool-namespace"]) == ("tokenwire", "tokenwire")


def test_ha_overlay_points_two_edges_at_its_redis() -> None:
    """The ha overlay runs at least two edges (its autoscaler's floor) whose
    TOKENWIRE_RESUME_STORE (which the edge's own settings accept) names the Redis Service it
    renders, on the port that Service serves."""
    docs = _docs("ha")
    env = _env(docs)
    settings = EdgeSettings.from_env(env)
    url = urlsplit(settings.resume_store)
    service = _find(docs, "Service", str(url.hostname))
    assert url.scheme == "redis"
    assert url.port in {p["port"] for p in service["spec"]["ports"]}
    redis = _find(docs, "Deployment", "tokenwire-redis")
    assert (
        service["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    assert _find(docs, "HorizontalPodAutoscaler", "tokenwire-edge")["spec"]["minReplicas"] >= 2


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "ha"])
def test_autoscaled_deployments_leave_their_replica_count_to_the_autoscaler(overlay: str) -> None:
    """No Deployment that a HorizontalPodAutoscaler scales sets spec.replicas: re-applying the
    manifests for a configuration change would otherwise reset a scaled-out Deployment to it."""
    docs = _docs(overlay)
    scaled = [
        d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"
    ]
    assert scaled
    for name in scaled:
        assert "replicas" not in _find(docs, "Deployment", name)["spec"], name


PART_OF = ("app.kubernetes.io/part-of", "tokenwire")
"""The label a PodMonitor selects the pods by (docs/deploy.md, Metrics)."""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_monitor_label_reaches_the_pods_but_not_the_selectors(overlay: str) -> None:
    """kustomize's `labels` put app.kubernetes.io/part-of on every pod template (includeTemplates:
    a PodMonitor selects pods, not Deployments) and leave every selector alone (a Deployment's
    selector is immutable once applied)."""
    key, value = PART_OF
    for d in _docs(overlay):
        spec = d.get("spec", {})
        if d["kind"] == "Deployment":
            assert spec["template"]["metadata"]["labels"].get(key) == value, d["metadata"]["name"]
            assert key not in spec["selector"]["matchLabels"], d["metadata"]["name"]
        elif d["kind"] == "Service":
            assert key not in spec["selector"], d["metadata"]["name"]
        elif d["kind"] == "PodDisruptionBudget":
            assert key not in spec["selector"]["matchLabels"], d["metadata"]["name"]


UPSTREAM_HEALTH_DEADLINE_S = 2
"""How long the edge's /readyz waits for a server's health answer (clients/edge/upstream.py)."""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_give_a_busy_pod_time_to_answer(overlay: str) -> None:
    """No probe runs on the default 1 s timeout: liveness waits 5 s per try and restarts after 6
    missed ones (a busy event loop answers late, it is not dead), readiness waits 3 s or more,
    and the edge's readiness outlasts the upstream health check its /readyz waits for."""
    containers = _containers(_docs(overlay))
    for name, c in containers.items():
        live, ready = c["livenessProbe"], c["readinessProbe"]
        assert live.get("timeoutSeconds", 1) >= 5, name
        assert live.get("failureThreshold", 3) >= 6, name
        assert ready.get("timeoutSeconds", 1) >= 3, name
    edge_ready = containers["tokenwire-edge"]["readinessProbe"]
    assert edge_ready["timeoutSeconds"] > UPSTREAM_HEALTH_DEADLINE_S


def _whole_cpus(quantity: str) -> int:
    assert re.fullmatch(r"[1-9][0-9]*", str(quantity)), f"{quantity!r} is not whole CPUs"
    return int(quantity)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_is_guaranteed_whole_cpus(overlay: str) -> None:
    """The server asks for what it may use, in whole CPUs (its intra-op threads, one per whole
    CPU of its quota, spin between operators): requests equal limits, so the pod is Guaranteed
    rather than running its threads on fewer guaranteed CPUs than it has threads."""
    server = _containers(_docs(overlay))["tokenwire-server"]
    resources = server["resources"]
    assert resources["requests"] == resources["limits"]
    assert _whole_cpus(resources["limits"]["cpu"]) >= 1


QUEUE_AUTOSCALING = "../../components/queue-autoscaling"
"""The component that scales the server on its queue, as an overlay names it."""


def _server_autoscalers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] == "HorizontalPodAutoscaler"
        and d["spec"]["scaleTargetRef"]["name"] == "tokenwire-server"
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_has_no_cpu_autoscaler_by_default(overlay: str) -> None:
    """Without the queue component no autoscaler scales the server (a CPU target would hold it
    at its maximum), and it runs two replicas, so its PodDisruptionBudget leaves one serving."""
    docs = _docs(overlay)
    assert _server_autoscalers(docs) == []
    assert _find(docs, "Deployment", "tokenwire-server")["spec"]["replicas"] >= 2


def _with_components(overlay: str, tmp_path: Path, *components: str) -> list[dict[str, Any]]:
    """The overlay rendered with components added, as docs/deploy.md says to, in a copy of
    k8s/; kubernetes-validate --strict accepts what renders."""
    copy = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", copy)
    kustomization = copy / "overlays" / overlay / "kustomization.yaml"
    spec = yaml.safe_load(kustomization.read_text())
    spec.setdefault("components", []).extend(components)
    kustomization.write_text(yaml.safe_dump(spec))
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(_render(overlay, copy))
    _validate_strictly(rendered)
    return [d for d in yaml.safe_load_all(rendered.read_text()) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_queue_component_scales_the_server_on_gauges_it_exports(
    overlay: str, tmp_path: Path
) -> None:
    """Added to any overlay, the component renders valid manifests with exactly one autoscaler
    for the server (nothing in the base collides with it), on per-pod gauges the server
    exports, and takes the server's replica count out of the Deployment."""
    docs = _with_components(overlay, tmp_path, QUEUE_AUTOSCALING)
    (hpa,) = _server_autoscalers(docs)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))
    assert hpa["metadata"]["namespace"] == "tokenwire"
    assert hpa["spec"]["minReplicas"] >= 2
    metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert "tokenwire_requests_waiting" in metrics
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Pods"}
    exposition = generate_latest(ServerMetrics().registry).decode()
    for gauge in metrics:
        assert f"# TYPE {gauge} gauge" in exposition
    assert "replicas" not in _find(docs, "Deployment", "tokenwire-server")["spec"]


SECRET = "tokenwire-secrets"


def _secret_variables() -> set[str]:
    """The variables of the server's and the edge's settings that are secrets (kept out of
    their repr): TOKENWIRE_API_KEYS, TOKENWIRE_UPSTREAM_API_KEY, TOKENWIRE_RESUME_STORE."""
    found = set()
    for cls in (Settings, EdgeSettings):
        secret = {f.name for f in dataclasses.fields(cls) if not f.repr}
        found |= {spec.env for spec in specs(cls) if spec.name in secret}
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_come_from_an_optional_secret_read_after_the_config(overlay: str) -> None:
    """Both Deployments read the Secret tokenwire-secrets (optional: without it the pods start,
    unauthenticated) after the ConfigMap, so its values win; the ConfigMap holds no API key,
    and a resume store URL in it carries no password."""
    docs = _docs(overlay)
    assert {"TOKENWIRE_API_KEYS", "TOKENWIRE_UPSTREAM_API_KEY"} <= _secret_variables()
    for deployment in TOKENWIRE:
        env_from = _containers(docs)[deployment]["envFrom"]
        assert "configMapRef" in env_from[0], deployment
        assert env_from[1:] == [{"secretRef": {"name": SECRET, "optional": True}}], deployment
    env = _env(docs)
    in_config = _secret_variables() & set(env)
    assert in_config <= {"TOKENWIRE_RESUME_STORE"}
    if "TOKENWIRE_RESUME_STORE" in env:
        assert urlsplit(env["TOKENWIRE_RESUME_STORE"]).password is None


def test_deploy_docs_create_the_secret_with_settings_that_exist() -> None:
    """docs/deploy.md's `kubectl create secret` names the Secret the Deployments read and only
    variables that the server or the edge read as secrets."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert f"kubectl -n tokenwire create secret generic {SECRET}" in text
    named = set(re.findall(r"--from-literal=(TOKENWIRE_[A-Z_]+)=", text))
    assert "TOKENWIRE_API_KEYS" in named
    assert named <= _secret_variables()


NETWORK_POLICY = "../../components/network-policy"
"""The component that lets only the edges reach the servers' gRPC port."""


def _pods(docs: list[dict[str, Any]], selector: dict[str, str]) -> list[str]:
    """The Deployments whose pods a label selector picks."""
    return [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "Deployment"
        and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]


def _policy(docs: list[dict[str, Any]], name: str) -> dict[str, dict[str, set[Any]]]:
    """A NetworkPolicy as {target Deployment: {source Deployment: ports}}: the Deployment whose
    pods it selects, the ones whose pods its ingress rules admit ("*" for any source), and the
    ports each may reach, each checked to be one the target's containers declare."""
    policy = _find(docs, "NetworkPolicy", name)["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    (target,) = _pods(docs, policy["podSelector"]["matchLabels"])
    pod = _find(docs, "Deployment", target)["spec"]["template"]["spec"]
    declared = {p["containerPort"] for c in pod["containers"] for p in c["ports"]} | {
        p["name"] for c in pod["containers"] for p in c["ports"]
    }
    rules: dict[str, set[Any]] = {}
    for rule in policy["ingress"]:
        sources = ["*"]
        if "from" in rule:
            assert all(set(peer) == {"podSelector"} for peer in rule["from"]), rule
            sources = [
                n for peer in rule["from"] for n in _pods(docs, peer["podSelector"]["matchLabels"])
            ]
            assert sources, rule  # a selector that matches no pod admits nobody
        ports = {p["port"] for p in rule["ports"]}
        assert ports <= declared, (name, ports)
        for source in sources:
            rules.setdefault(source, set()).update(ports)
    return {target: rules}


def test_redis_accepts_only_the_edges() -> None:
    """In the ha overlay, Redis' NetworkPolicy selects the Redis pods and admits the edge pods,
    and nothing else, on the port Redis serves."""
    docs = _docs("ha")
    assert _policy(docs, "tokenwire-redis") == {"tokenwire-redis": {"tokenwire-edge": {"redis"}}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_component_admits_only_edges_to_grpc(overlay: str, tmp_path: Path) -> None:
    """Added to any overlay (with queue autoscaling too), the component's NetworkPolicy selects
    the server pods and admits the edge pods to the gRPC port, and anyone to the metrics port
    only; the result validates."""
    docs = _with_components(overlay, tmp_path, NETWORK_POLICY, QUEUE_AUTOSCALING)
    assert _policy(docs, "tokenwire-server") == {
        "tokenwire-server": {"tokenwire-edge": {"grpc"}, "*": {"metrics"}}
    }
    policies = {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies == (
        {"tokenwire-server", "tokenwire-redis"} if overlay == "ha" else {"tokenwire-server"}
    )
