"""Heavy optional dependencies stay unloaded until a config uses them: cryptography (~6 MB resident, v1a
ed25519 keys), asyncpg (~2.6 MB, a PostgreSQL store), Jinja (~2 MB, notify templates), and httpx and
aiohttp (some 30 MB together: the client of notify and acknowledge; forward has its own).

Each case serves a config in a fresh interpreter, as `hookyard serve` does, sends it one good and one badly
signed webhook per source, and reads sys.modules once it has stopped."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

OPTIONAL = ("cryptography", "asyncpg", "jinja2")
# Loaded by an action that sends with `Resources.http` once it sends (httpx alone already checks its URL).
HTTP_LIBRARIES = ("httpx", "aiohttp")

# 32 bytes of ed25519 seed: the whsk_ key signs (v1a) and its public half verifies.
WHSK_SECRET = "whsk_" + base64.b64encode(bytes(range(32))).decode()

CHILD = """
import asyncio, json, socket, sys, time, urllib.error, urllib.request
from pathlib import Path

import gateway.app, gateway.cli, plugins
from gateway.app import Gateway
from gateway.cli import _load, _run

BAD_SIGNATURE = "v1," + "A" * 43 + "= v1a," + "A" * 86 + "=="


def status(url, body=None, headers={}):
    # The standard library's client, in a thread: httpx is one of the modules looked for.
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def bound_socket():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def main(path):
    config, _ = _load(path)
    gw = Gateway(config, config_path=path)
    ingress, ops = bound_socket(), bound_socket()
    url, ops_url = (f"http://127.0.0.1:{s.getsockname()[1]}" for s in (ingress, ops))
    serving = asyncio.create_task(gw.serve([ingress], [ops]))
    statuses = []
    for _ in range(200):
        if await asyncio.to_thread(status, ops_url + "/readyz") == 200:
            break
        await asyncio.sleep(0.05)
    for endpoint in gw.table.endpoints.values():
        body = json.dumps({"type": "user.created", "data": {"id": "u1"}}).encode()
        headers = endpoint.provider.sign(body, "msg_1", time.time())
        good = await asyncio.to_thread(status, url + endpoint.path, body, headers)
        headers = {k: BAD_SIGNATURE if k.endswith("signature") else v for k, v in headers.items()}
        bad = await asyncio.to_thread(status, url + endpoint.path, body, headers)
        statuses.append([good, bad])
    gw.request_exit()
    await serving
    print(json.dumps({"statuses": statuses, "modules": sorted(sys.modules)}))


_run(main(Path(sys.argv[1])))
"""


def config(tmp_path: Path, secret: str, unused_actions: list[dict[str, Any]]) -> dict[str, Any]:
    forward = {"id": "app", "use": "forward", "with": {"url": "http://127.0.0.1:9/hooks"}}
    routes = [{"name": "users", "source": "users", "events": ["user.*"], "actions": [forward]}]
    if unused_actions:
        # Built at start-up like any others, but no webhook sent matches: nothing connects to the database
        # or posts a notification.
        routes.append(
            {"name": "unused", "source": "users", "events": ["never.sent"], "actions": unused_actions}
        )
    return {
        "storage": {"url": f"sqlite:///{tmp_path}/hookyard.db"},
        "delivery": {"shutdown_timeout": "2s"},
        "log": {"level": "error"},
        "sources": {"users": {"path": "/webhooks/users", "provider": "svix", "secrets": [secret]}},
        "routes": routes,
    }


def serve_and_list_modules(tmp_path: Path, config: dict[str, Any]) -> tuple[list[list[int]], set[str]]:
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {key: value for key, value in os.environ.items() if not key.startswith("HOOKYARD_")}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    return answer["statuses"], {name.split(".")[0] for name in answer["modules"]}


def test_whsec_sources_and_forwarding_load_no_optional_dependency_nor_an_http_library(tmp_path: Path) -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    statuses, modules = serve_and_list_modules(tmp_path, config(tmp_path, secret, []))
    assert statuses == [[200, 401]]
    assert sorted(modules.intersection(OPTIONAL + HTTP_LIBRARIES)) == []


def test_each_optional_dependency_loads_when_the_config_uses_it(tmp_path: Path) -> None:
    unused = [
        {
            "id": "table",
            "use": "store",
            "with": {"url": "postgresql://hookyard@127.0.0.1:1/app", "table": "t"},
        },
        {
            "id": "alert",
            "use": "notify",
            "with": {"url": "http://127.0.0.1:9/", "template": "{{ event.id }}"},
        },
    ]
    statuses, modules = serve_and_list_modules(tmp_path, config(tmp_path, WHSK_SECRET, unused))
    # The whsk_ key signed (v1a) and its public half verified.
    assert statuses == [[200, 401]]
    assert sorted(modules.intersection(OPTIONAL)) == sorted(OPTIONAL)
    assert "httpx" in modules  # notify's URL, checked as its client reads it
