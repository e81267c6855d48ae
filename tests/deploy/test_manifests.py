"""Deployment files checked by the tools that consume them: docker-compose, nginx (also live, in front of a
real server), and the Kubernetes schemas (kubernetes-validate, offline) over each kustomization's output."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from support import free_port

from service.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
K8S_VERSIONS = ["1.28", kubernetes_validate.utils.latest_version()]


# --- docker-compose ---------------------------------------------------------------------------------------------

def compose_config(*profiles: str) -> dict[str, Any]:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed")
    flags = [arg for p in profiles for arg in ("--profile", p)]
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), *flags, "config"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = yaml.safe_load(out.stdout)
    return config


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path, from the short ("src:dst:ro") or the long syntax."""
    out = {}
    for v in service.get("volumes", []):
        source, target = (v.split(":")[:2] if isinstance(v, str) else (v["source"], v["target"]))
        out[target] = Path(source)
    return out


def test_compose_default_stack() -> None:
    services = compose_config()["services"]
    assert {"api", "prometheus", "grafana"} <= set(services)
    api = services["api"]
    assert api["build"]["args"]["BASE_IMAGE"]
    assert [p["target"] for p in api["ports"]] == [8000]
    assert "/health" in " ".join(api["healthcheck"]["test"])
    assert mounts(api)["/models"] == ROOT / "model" / "checkpoints"
    assert api["environment"]["ATTNSERVE_MODELS_DIR"] == "/models"
    assert mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == ROOT / "deploy" / "prometheus.yml"
    assert mounts(services["grafana"]) == {"/etc/grafana/provisioning": ROOT / "deploy/grafana/provisioning",
                                           "/var/lib/grafana/dashboards": ROOT / "deploy/grafana/dashboards"}


def test_compose_every_profile() -> None:
    services = compose_config("gpu", "scale")["services"]
    assert {"api", "replica", "lb", "api-gpu", "prometheus", "grafana"} <= set(services)
    replica = services["replica"]
    assert "ports" not in replica, "a scaled service must not publish a fixed host port"
    assert "api" in replica["networks"]["default"]["aliases"]  # the name the load balancer resolves
    lb = services["lb"]
    assert mounts(lb)["/etc/nginx/nginx.conf"] == NGINX_CONF
    assert lb["depends_on"]["replica"]["condition"] == "service_healthy"
    gpu = services["api-gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["ATTNSERVE_DEVICE"] == "cuda"
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]


# --- nginx ------------------------------------------------------------------------------------------------------

def nginx_copy(tmp_path: Path, upstream: str, port: int) -> Path:
    """The load balancer config with the compose host `api` (unresolvable here) replaced by a loopback address."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed")
    text = NGINX_CONF.read_text()
    text, n = re.subn(r"server api:8000\b", f"server {upstream}", text)
    assert n == 1
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};").replace("pid /tmp/nginx.pid;",
                                                                            f"pid {tmp_path}/nginx.pid;")
    copy_path = tmp_path / "nginx.conf"
    copy_path.write_text(text.replace("access_log /dev/stdout;", "access_log off;"))
    return copy_path


def test_nginx_config_is_valid_and_sse_safe(tmp_path: Path) -> None:
    conf = nginx_copy(tmp_path, "127.0.0.1:8000", free_port())
    out = subprocess.run(["nginx", "-t", "-q", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text = NGINX_CONF.read_text()
    for directive in ("proxy_buffering off;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                      "keepalive 32;", "proxy_read_timeout 3600s;"):
        assert directive in text


@pytest.fixture
def nginx_in_front(tmp_path: Path, make_server: Callable[..., Any]) -> Iterator[str]:
    server = make_server()
    port = free_port()
    conf = nginx_copy(tmp_path, f"127.0.0.1:{server.port}", port)
    proc = subprocess.Popen(["nginx", "-e", "stderr", "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/lb-health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_nginx_passes_streams_through_as_they_come(nginx_in_front: str) -> None:
    body = {"model": "tiny-gpt", "prompt": "ROMEO:", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    assert httpx.get(f"{nginx_in_front}/ready").status_code == 200
    plain = httpx.post(f"{nginx_in_front}/v1/generate", json=body, timeout=60).json()
    reads: list[bytes] = []
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{nginx_in_front}/v1/generate",
                                                           json={**body, "stream": True}) as response:
        reads.extend(response.iter_bytes())
    texts = [json.loads(line[len("data: "):])["text"] for line in b"".join(reads).decode().splitlines()
             if line.startswith("data: ") and '"text"' in line and '"finish_reason"' not in line]
    assert "".join(texts) == plain["text"] and len(texts) == 100
    # Unbuffered: the events come in many reads as the tokens are made (a buffering proxy hands the whole ~10 kB
    # stream over in one or two). Counting reads, not timing them, keeps this true on a busy machine.
    token_reads = sum(b"event: token" in chunk for chunk in reads)
    assert token_reads >= 10, [len(chunk) for chunk in reads]


# --- Kubernetes -------------------------------------------------------------------------------------------------

def merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize does it for these manifests: maps merge, lists of named items merge by
    name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    named = isinstance(base, list) and isinstance(patch, list) and all(
        isinstance(i, dict) and "name" in i for i in base + patch)
    if named:
        out_list = [copy.deepcopy(i) for i in base]
        for item in patch:
            same = [k for k, b in enumerate(out_list) if b["name"] == item["name"]]
            if same:
                out_list[same[0]] = merge(out_list[same[0]], item)
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def build(folder: Path) -> list[dict[str, Any]]:
    """The resources a kustomization folder produces (resources, patches, images, labels)."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    docs: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        path = (folder / entry).resolve()
        docs += build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for p in kust.get("patches", []):
        patch = yaml.safe_load((folder / p["path"]).read_text())
        hits = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) ==
                (patch["kind"], patch["metadata"]["name"])]
        assert len(hits) == 1, f"patch {p['path']} matches {len(hits)} resources"
        docs[hits[0]] = merge(docs[hits[0]], patch)
    for image in kust.get("images", []):
        for d in docs:
            for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"].split(":")[0] == image["name"]:
                    c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for label in kust.get("labels", []):
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(label["pairs"])
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs)
    return kinds


@pytest.mark.parametrize("folder", ["", "overlays/gpu", "overlays/queue-depth"])
def test_kustomizations_validate_against_the_kubernetes_schemas(folder: str) -> None:
    docs = build(K8S / folder)
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
                                         "PodDisruptionBudget"}
    for doc in docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_base_manifests_fit_together() -> None:
    k = by_kind(build(K8S))
    env = k["ConfigMap"]["data"]
    assert {name.removeprefix("ATTNSERVE_").lower() for name in env} <= set(Settings.model_fields)
    pod = k["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for selector in (k["Service"]["spec"]["selector"], k["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
                     k["Deployment"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert container["envFrom"][0]["configMapRef"]["name"] == k["ConfigMap"]["metadata"]["name"]
    assert container["image"] == "attnserve:0.1.0"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["ATTNSERVE_DRAIN_TIMEOUT"]) + pre_stop
    security = pod["spec"]["securityContext"]
    uid = re.search(r"^ARG APP_UID=(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert security["runAsNonRoot"] is True and uid and security["runAsUser"] == int(uid.group(1))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert k["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == k["Deployment"]["metadata"]["name"]
    assert k["Service"]["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_gpu_overlay_asks_for_a_gpu() -> None:
    (container,) = by_kind(build(K8S / "overlays" / "gpu"))["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {e["name"]: e["value"] for e in container["env"]}["ATTNSERVE_DEVICE"] == "cuda"
    assert container["image"].endswith("-cuda")
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"  # the base survives the patch


def test_queue_depth_overlay_scales_on_a_metric_the_service_exports() -> None:
    hpa = by_kind(build(K8S / "overlays" / "queue-depth"))["HorizontalPodAutoscaler"]
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    exported = [family.name for family in Metrics().requests_waiting.describe()]
    assert [p["metric"]["name"] for p in pods] == exported
