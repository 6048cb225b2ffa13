"""Ingest benchmark: a bare Starlette no-op against Hookyard's verified, durable ingest, in one run.

    make bench                     # or: .venv/bin/python bench/ingest.py --duration 10

Every server and the load generator run on 127.0.0.1; each load phase is bounded in time. Needs `wrk`
(Debian package wrk); says so and stops when it is missing. Prints a table and writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PATH = "/webhooks/consignease"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server at {url} did not come up")


def body_1kb() -> bytes:
    data = {"id": "user_29w83sxmDNGwOuEthce5gg56FcC", "first_name": "Ada", "last_name": "Lovelace", "bio": ""}
    payload = {
        "data": data,
        "object": "event",
        "type": "user.created",
        "timestamp": 0,
        "instance_id": "ins_1",
    }
    filler = 1024 - len(json.dumps(payload))
    data["bio"] = "x" * max(0, filler)
    return json.dumps(payload).encode()


def write_requests(directory: Path, body: bytes, count: int) -> tuple[Path, Path]:
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    timestamp = str(int(time.time()))
    lines = []
    for index in range(count):
        msg_id = f"msg_bench_{os.getpid()}_{index}"
        mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        lines.append(f"{msg_id}\t{timestamp}\tv1,{base64.b64encode(mac).decode()}")
    requests_path, body_path = directory / "requests.tsv", directory / "body.json"
    requests_path.write_text("\n".join(lines) + "\n")
    body_path.write_bytes(body)
    return requests_path, body_path


def run_wrk(
    url: str, duration: int, connections: int, threads: int, requests: Path, body: Path
) -> dict[str, float]:
    script = ROOT / "bench" / "signed_requests.lua"
    command = [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration}s",
        "--latency",
        "-s",
        str(script),
        url,
        "--",
        str(requests),
        str(body),
        str(threads),
    ]
    output = subprocess.run(command, capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    latency = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"\s+(50|99)%\s+([\d.]+\w+)", output)}
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    return {
        "rps": rps,
        "p50_ms": latency.get("50", 0),
        "p99_ms": latency.get("99", 0),
        "non_2xx": float(non_2xx.group(1)) if non_2xx else 0.0,
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(
    name: str,
    process: subprocess.Popen[bytes],
    url: str,
    args: argparse.Namespace,
    requests: Path,
    body: Path,
) -> dict[str, float | str]:
    run_wrk(url, 2, args.connections, args.threads, requests, body)  # warm-up
    cpu_before = cpu_seconds(process.pid)
    result: dict[str, float | str] = {
        "name": name,
        **run_wrk(url, args.duration, args.connections, args.threads, requests, body),
    }
    cpu = cpu_seconds(process.pid) - cpu_before
    result["cpu_us_per_request"] = cpu / (float(result["rps"]) * args.duration) * 1e6
    result["rss_mb"] = rss_mb(process.pid)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per server (bounded)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk); nothing was measured")

    python = sys.executable
    results = []
    with tempfile.TemporaryDirectory(prefix="hookyard-bench-") as tmp:
        work = Path(tmp)
        body = body_1kb()
        requests, body_path = write_requests(work, body, count=args.duration * 40_000)

        port = free_port()
        noop = subprocess.Popen(
            [
                python,
                "-m",
                "uvicorn",
                "bench.noop_app:app",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}/")
            results.append(
                measure("starlette no-op", noop, f"http://127.0.0.1:{port}{PATH}", args, requests, body_path)
            )
        finally:
            noop.send_signal(signal.SIGTERM)
            noop.wait(10)

        sink_port, port, ops = free_port(), free_port(), free_port()
        sink = subprocess.Popen(
            [python, "-m", "gateway", "sink", "--port", str(sink_port)], stdout=subprocess.DEVNULL, cwd=ROOT
        )
        config = {
            "listen": {"host": "127.0.0.1", "port": port},
            "ops": {"host": "127.0.0.1", "port": ops},
            "storage": {"url": f"sqlite:///{work}/bench.db"},
            "log": {"level": "warning"},
            "sources": {"consignease": {"path": PATH, "provider": "svix", "secrets": [SECRET]}},
            "routes": [
                {
                    "name": "users",
                    "source": "consignease",
                    "events": ["user.*"],
                    "actions": [
                        {
                            "id": "app",
                            "use": "forward",
                            "with": {"url": f"http://127.0.0.1:{sink_port}/hooks"},
                        }
                    ],
                }
            ],
        }
        (work / "routes.yaml").write_text(yaml.safe_dump(config))
        gateway = subprocess.Popen(
            [python, "-m", "gateway", "serve", "-c", str(work / "routes.yaml")], cwd=ROOT
        )
        try:
            wait_ready(f"http://127.0.0.1:{ops}/readyz")
            hookyard = measure(
                "hookyard ingest (svix + durable + route)",
                gateway,
                f"http://127.0.0.1:{port}{PATH}",
                args,
                requests,
                body_path,
            )
            metrics = httpx.get(f"http://127.0.0.1:{ops}/metrics").text
            batches = _sample(metrics, "hookyard_storage_batch_size_count")
            operations = _sample(metrics, "hookyard_storage_batch_size_sum")
            hookyard["operations_per_commit"] = operations / batches if batches else 0.0
            results.append(hookyard)
        finally:
            gateway.send_signal(signal.SIGTERM)
            sink.send_signal(signal.SIGTERM)
            gateway.wait(30)
            sink.wait(10)

    baseline = float(results[0]["rps"])
    print(
        f"\n{'server':<42} {'req/s':>9} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} {'cpu µs/req':>10} {'RSS MB':>7}"
    )
    for row in results:
        row["ratio"] = float(row["rps"]) / baseline
        print(
            f"{row['name']:<42} {row['rps']:>9.0f} {row['ratio']:>6.2f} {row['p50_ms']:>7.2f} "
            f"{row['p99_ms']:>7.2f} {row['cpu_us_per_request']:>10.0f} {row['rss_mb']:>7.1f}"
        )
    print(f"\ngroup commit: {results[1]['operations_per_commit']:.1f} storage operations per fsync'd commit")
    out = ROOT / "bench" / "results" / "ingest.json"
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "duration_s": args.duration,
                "connections": args.connections,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(ROOT)}")


def _sample(exposition: str, name: str) -> float:
    match = re.search(rf"^{name} ([\d.e+]+)$", exposition, re.M)
    return float(match.group(1)) if match else 0.0


if __name__ == "__main__":
    main()
