"""Operating Hookyard: hot reload as a ConfigMap update does it, SIGHUP, SIGTERM under load, TLS."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support import (
    Downstream,
    GatewayProcess,
    RunningGateway,
    free_port,
    gateway_config,
    svix_request,
    wait_until,
)


def users_config(tmp_path: Path, downstream: Downstream, target: str, **extra: Any) -> dict[str, Any]:
    config = gateway_config(tmp_path, **extra)
    config["reload"] = {"interval": "100ms"}
    config["routes"] = [
        {
            "name": "users",
            "source": "consignease",
            "actions": [{"id": "app", "use": "forward", "with": {"url": f"{downstream.url}{target}"}}],
        }
    ]
    return config


class ConfigMapVolume:
    """A directory laid out as the kubelet lays out a ConfigMap volume, updated the way it updates one:
    write a new timestamped directory, then atomically swap the `..data` symlink. Files are never
    rewritten in place."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.generation = 0

    @property
    def path(self) -> Path:
        return self.root / "routes.yaml"

    def publish(self, config: dict[str, Any] | str) -> None:
        self.generation += 1
        version = self.root / f"..2026_11_22_10_00_{self.generation:02}.{os.getpid()}"
        version.mkdir()
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        (version / "routes.yaml").write_text(text)
        staging = self.root / "..data_tmp"
        staging.symlink_to(version.name)
        staging.replace(self.root / "..data")  # rename(2): atomic
        if not self.path.is_symlink():
            self.path.symlink_to("..data/routes.yaml")


def test_configmap_swap_changes_routing_without_restart(tmp_path: Path, downstream: Downstream) -> None:
    volume = ConfigMapVolume(tmp_path / "config")
    volume.publish(users_config(tmp_path, downstream, "/before"))
    with RunningGateway(volume.path) as gw:
        body, headers = svix_request(msg_id="msg_before")
        gw.post("/webhooks/consignease", body, headers)
        downstream.wait_for(1, "/before")

        volume.publish(users_config(tmp_path, downstream, "/after"))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        body, headers = svix_request(msg_id="msg_after")
        gw.post("/webhooks/consignease", body, headers)
        [after] = downstream.wait_for(1, "/after")
        assert after.headers["idempotency-key"] == "msg_after"

        # An invalid update is refused: the running routes stay.
        broken = users_config(tmp_path, downstream, "/broken")
        broken["routes"][0]["actions"][0]["use"] = "no-such-action"
        volume.publish(broken)
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="error") == 1)
        body, headers = svix_request(msg_id="msg_still_after")
        gw.post("/webhooks/consignease", body, headers)
        downstream.wait_for(2, "/after")
        assert downstream.received("/broken") == []
        assert gw.client.get(gw.ops_url + "/readyz").status_code == 200
        # The bad update is refused once, not again at every look at the file.
        assert gw.metric("hookyard_config_reloads_total", result="error") == 1

        # A source added by a reload answers on its path.
        added = users_config(tmp_path, downstream, "/after")
        added["sources"]["extra"] = {"path": "/webhooks/extra", "provider": "consignly", "secrets": ["s"]}
        volume.publish(added)
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 2)
        assert gw.post("/webhooks/extra", b"{}", {}).json()["error"] == "missing_signature"


def start_process(tmp_path: Path, config: dict[str, Any]) -> tuple[GatewayProcess, str]:
    ingress, ops = free_port(), free_port()
    config["listen"] = {"host": "127.0.0.1", "port": ingress, **config.get("listen", {})}
    config["ops"] = {"host": "127.0.0.1", "port": ops}
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    process = GatewayProcess(path, f"http://127.0.0.1:{ops}").start()
    return process, f"http://127.0.0.1:{ingress}"


def test_sighup_reloads(tmp_path: Path, downstream: Downstream) -> None:
    config = users_config(tmp_path, downstream, "/before")
    config["reload"] = {"watch": False}
    process, url = start_process(tmp_path, config)
    try:
        changed = users_config(tmp_path, downstream, "/after")
        changed["reload"] = {"watch": False}
        changed["listen"], changed["ops"] = config["listen"], config["ops"]
        process.config_path.write_text(yaml.safe_dump(changed))
        assert process.process is not None
        process.process.send_signal(signal.SIGHUP)
        metrics_url = process.ops_url + "/metrics"
        wait_until(
            lambda: 'hookyard_config_reloads_total{result="success"} 1.0' in httpx.get(metrics_url).text
        )
        body, headers = svix_request()
        assert httpx.post(url + "/webhooks/consignease", content=body, headers=headers).status_code == 200
        downstream.wait_for(1, "/after")
    finally:
        process.kill()


def test_sigterm_under_load_loses_nothing(tmp_path: Path, downstream: Downstream) -> None:
    downstream.delay = 0.05
    config = users_config(tmp_path, downstream, "/app", listen={"drain_delay": "500ms"})
    config["delivery"] = {"concurrency": 8, "shutdown_timeout": "2s", "lease": "10m"}
    process, url = start_process(tmp_path, config)
    answered: list[str] = []
    failed = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal failed
        with httpx.Client(timeout=5) as client:
            index = 0
            while not stop.is_set() and index < 2000:
                body, headers = svix_request(msg_id=f"msg_term_{threading.get_ident()}_{index}")
                index += 1
                try:
                    response = client.post(url + "/webhooks/consignease", content=body, headers=headers)
                except httpx.HTTPError:
                    failed += 1
                    continue
                if response.status_code == 200:
                    answered.append(response.json()["id"])
                else:
                    failed += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(answered) >= 100, 20)
        assert process.process is not None
        started = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        # While draining, readiness says no but webhooks are still taken.
        assert httpx.get(process.ops_url + "/readyz").status_code == 503
        assert process.process.wait(30) == 0
        took = time.monotonic() - started
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert took < 15, f"shutdown took {took:.1f}s"
    delivered_before_restart = {r.headers["idempotency-key"] for r in downstream.received("/app")}

    process.start()  # the next pod start delivers whatever the last one did not get to
    try:
        wait_until(
            lambda: {r.headers["idempotency-key"] for r in downstream.received("/app")} >= set(answered), 30
        )
    finally:
        process.kill()
    assert len(answered) >= 100
    assert len(delivered_before_restart) > 0


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_renewed_certificate_files_are_picked_up_without_a_config_change(
    tmp_path: Path, downstream: Downstream
) -> None:
    cert, key = self_signed(tmp_path, "current")
    renewed_cert, renewed_key = self_signed(tmp_path, "renewed")
    config_path = tmp_path / "routes.yaml"
    config = users_config(tmp_path, downstream, "/app", listen={"tls": {"cert": str(cert), "key": str(key)}})
    config_path.write_text(yaml.safe_dump(config))
    with RunningGateway(config_path, scheme="https") as gw:
        # cert-manager renews in place (a Secret volume swaps its files): same paths, new content.
        cert.write_bytes(renewed_cert.read_bytes())
        key.write_bytes(renewed_key.read_bytes())
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        body, headers = svix_request(msg_id="msg_renewed")
        with httpx.Client(verify=ssl.create_default_context(cafile=renewed_cert)) as client:
            assert (
                client.post(gw.url + "/webhooks/consignease", content=body, headers=headers).status_code
                == 200
            )


def test_tls_listener_and_certificate_reload(tmp_path: Path, downstream: Downstream) -> None:
    first_cert, first_key = self_signed(tmp_path, "first")
    second_cert, second_key = self_signed(tmp_path, "second")
    config_path = tmp_path / "routes.yaml"
    config = users_config(
        tmp_path, downstream, "/app", listen={"tls": {"cert": str(first_cert), "key": str(first_key)}}
    )
    config_path.write_text(yaml.safe_dump(config))
    with RunningGateway(config_path, scheme="https") as gw:
        body, headers = svix_request()
        with httpx.Client(verify=ssl.create_default_context(cafile=first_cert)) as client:
            response = client.post(gw.url + "/webhooks/consignease", content=body, headers=headers)
        assert response.status_code == 200
        config["listen"]["tls"] = {"cert": str(second_cert), "key": str(second_key)}
        config_path.write_text(yaml.safe_dump(config))
        wait_until(lambda: gw.metric("hookyard_config_reloads_total", result="success") == 1)
        body, headers = svix_request(msg_id="msg_second_cert")
        with httpx.Client(verify=ssl.create_default_context(cafile=second_cert)) as client:
            response = client.post(gw.url + "/webhooks/consignease", content=body, headers=headers)
        assert response.status_code == 200
