"""Kubernetes manifests and images, checked offline: render, validate, lint, invariants."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ["cpu", "gpu"]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(BIN))
    if found is None:
        pytest.fail(f"{name} is missing: `make install` (PyPI) or the Debian image provides it")
    return found


def _render(overlay: str) -> str:
    kubectl = _tool("kubectl")
    done = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def _docs(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_render(overlay)) if d]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _env(docs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(_find(docs, "ConfigMap", "tokenwire-config")["data"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay: str, tmp_path: Path) -> None:
    """`kubectl kustomize` renders the overlay and kubernetes-validate --strict accepts it."""
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(_render(overlay))
    done = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", str(rendered)],
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
                    action = c[probe].get("grpc") or c[probe].get("httpGet")
                    assert action["port"] in declared, (deployment["metadata"]["name"], probe)


@pytest.mark.parametrize("deployment", ["tokenwire-server", "tokenwire-edge"])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_prestop_and_drain(overlay: str, deployment: str) -> None:
    """terminationGracePeriodSeconds >= preStop sleep + TOKENWIRE_DRAIN_GRACE_S (both drain)."""
    docs = _docs(overlay)
    spec = _find(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    container = spec["containers"][0]
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(_env(docs)["TOKENWIRE_DRAIN_GRACE_S"])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain


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


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_provider() -> None:
    """The GPU overlay requests nvidia.com/gpu, tolerates GPU taints and selects CUDA."""
    docs = _docs("gpu")
    pod = _find(docs, "Deployment", "tokenwire-server")["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert server["image"].endswith("-cuda")
    assert _env(docs)["TOKENWIRE_PROVIDER"] == "cuda"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_edge_balances_over_the_headless_service(overlay: str) -> None:
    """The edge targets dns:/// of the headless Service, which has no cluster IP."""
    docs = _docs(overlay)
    target = _env(docs)["TOKENWIRE_GRPC_TARGET"]
    assert target.startswith("dns:///tokenwire-grpc-headless")
    assert _find(docs, "Service", "tokenwire-grpc-headless")["spec"]["clusterIP"] == "None"
    assert float(_env(docs)["TOKENWIRE_MAX_CONNECTION_AGE_S"]) > 0
