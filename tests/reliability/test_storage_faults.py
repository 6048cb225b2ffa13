"""Scenario 3: the store fails under the gateway. A full disk (a real tmpfs filled to the last byte, or
SQLite's max_page_count where mounting is not allowed), a database that turns read-only under load (its
writes answered EROFS), a real ext4 file system that the kernel turns read-only, and a PostgreSQL server
that `store` writes to going away. The ingress must answer 503 storage_unavailable, never 2xx, while nothing
can be stored; /readyz must say so; and service must resume by itself (after the kernel's read-only
remount, once an operator has repaired and remounted the file system)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest

from tests.reliability.harness import (
    Load,
    child_gateway,
    delivered_keys,
    in_process,
    read_db,
    record,
    sampler,
    signed_events,
)
from tests.support import (
    Downstream,
    RunningGateway,
    TcpProxy,
    gateway_config,
    svix_request,
    tmpfs,
    unavailable,
    wait_until,
)

PATH = "/webhooks/consignease"


def _users_route(app: Downstream, *extra: dict[str, Any]) -> list[dict[str, Any]]:
    forward = {"id": "app", "use": "forward", "with": {"url": f"{app.url}/app"}}
    return [{"name": "users", "source": "consignease", "actions": [*extra, forward]}]


def _run(gw: RunningGateway, coroutine: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coroutine, gw.loop).result(10)


def _between_transactions(gw: RunningGateway, sql: str) -> None:
    """Execute on the writer connection from the gateway's own loop while no transaction is open: the
    database changes between two group commits. (Lifting query_only cannot go through the group commit:
    with it on, even BEGIN IMMEDIATE fails.)"""
    connection = gw.gateway.storage._writer.connection  # type: ignore[attr-defined]

    async def execute() -> None:
        for _ in range(10_000):
            if not connection.in_transaction:
                # Operations run only on this thread: nothing opens a transaction before the next await.
                connection.execute(sql)
                return
            await asyncio.sleep(0.0005)
        raise AssertionError("the writer never left its transaction")

    _run(gw, execute())


def _ready(gw: RunningGateway) -> int:
    return gw.client.get(gw.ops_url + "/readyz").status_code


def _post(gw: RunningGateway, msg_id: str) -> tuple[int, str]:
    body, headers = svix_request(data={"id": msg_id, "pad": "x" * 300}, msg_id=msg_id)
    response = gw.post(PATH, body, headers)
    answer = response.json()
    return response.status_code, answer.get("status") or answer.get("error")


# -- disk full ----------------------------------------------------------------------------------------------


def fill(directory: Path) -> int:
    """Write a ballast file until the file system says ENOSPC; its size (0: it was full already)."""
    written = 0
    try:
        with (directory / "ballast").open("wb") as ballast:
            for _ in range(1_000_000):
                ballast.write(b"\0" * 65536)
                ballast.flush()
                written += 65536
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    return written


class Disk:
    """Makes the store unable to grow, and gives the room back."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path

    @contextlib.contextmanager
    def storage_directory(self) -> Iterator[Path]:
        if self.kind == "tmpfs":
            with tmpfs(self.tmp_path / "disk", "8m") as directory:
                yield directory
        else:
            yield self.tmp_path

    def make_full(self, gw: RunningGateway) -> dict[str, Any]:
        if self.kind == "tmpfs":
            disk = self.tmp_path / "disk"
            # What the store held before the ballast: shown in the figures, for a run that finds it full.
            held = sum(path.stat().st_size for path in disk.iterdir() if path.is_file())
            return {"store_bytes_before": held, "ballast_bytes": fill(disk)}
        storage = gw.gateway.storage
        pages = _run(gw, storage._run(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0]))  # type: ignore[attr-defined]
        _run(gw, storage._run(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages}")))  # type: ignore[attr-defined]
        return {"max_page_count": pages}

    def free(self, gw: RunningGateway) -> None:
        if self.kind == "tmpfs":
            (self.tmp_path / "disk" / "ballast").unlink()
        else:
            storage = gw.gateway.storage
            _run(gw, storage._run(lambda conn: conn.execute("PRAGMA max_page_count = 4294967294")))  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tmpfs", "max_page_count"])
def test_disk_full_answers_503_never_2xx_and_recovers_without_restart(
    tmp_path: Path, app: Downstream, kind: str
) -> None:
    started = time.monotonic()
    disk = Disk(kind, tmp_path)
    with disk.storage_directory() as directory:
        config = gateway_config(directory, app.url, routes=_users_route(app))
        with in_process(config) as gw:
            before = [_post(gw, f"msg_full_before_{n}") for n in range(5)]
            assert all(status == 200 for status, _ in before)
            how = disk.make_full(gw)
            # Rows that still fit in the pages already there are stored (and answered 2xx) until the first
            # refusal; from then on the store is full.
            filling: list[tuple[int, str]] = []
            for n in range(2000):
                filling.append(_post(gw, f"msg_filling_{n:04}"))
                if filling[-1][0] != 200:
                    break
            first_refusal = f"msg_filling_{len(filling) - 1:04}"

            # Full: every new event is refused with 503 storage_unavailable; nothing is answered 2xx.
            while_full = {f"msg_full_{n:03}": _post(gw, f"msg_full_{n:03}") for n in range(50)}
            while_full[first_refusal] = filling[-1]
            ready_while_full = _ready(gw)
            readyz_reason = gw.client.get(gw.ops_url + "/readyz").json().get("reason")
            refusals = gw.metric(
                "hookyard_webhook_rejections_total", source="consignease", reason="storage_unavailable"
            )

            disk.free(gw)
            # Space is back: the same requests, sent again, are accepted (they were never stored).
            recovered_at = time.monotonic()
            retried = {msg_id: _post(gw, msg_id) for msg_id in while_full}
            recovery_s = time.monotonic() - recovered_at
            ready_after = _ready(gw)
            after = [_post(gw, f"msg_full_after_{n}") for n in range(5)]
            expected = set(while_full) | {f"msg_full_after_{n}" for n in range(5)}
            wait_until(lambda: set(delivered_keys(app)) >= expected, 20)
            delivered = set(delivered_keys(app))
        stored = {row[0] for row in read_db(directory / "hookyard.db", "SELECT event_id FROM events")}
    figures = {
        "fault": kind,
        **how,
        "accepted_before_first_refusal": len(filling) - 1,
        "requests_while_full": len(while_full),
        "answers_while_full": sorted({f"{status} {reason}" for status, reason in while_full.values()}),
        "readyz_while_full": ready_while_full,
        "readyz_reason_while_full": readyz_reason,
        "storage_unavailable_counted": refusals,
        "answers_after_space_returned": sorted({f"{status} {reason}" for status, reason in retried.values()}),
        "first_retries_took_s": round(recovery_s, 2),
        "readyz_after": ready_after,
        "delivered": len(delivered),
        "test_s": round(time.monotonic() - started, 1),
    }
    record(f"disk_full_{kind}", figures, tmp_path)

    assert set(while_full.values()) == {(503, "storage_unavailable")}
    assert refusals == len(while_full)
    assert set(retried.values()) == {(200, "accepted")}, "a 503 must mean nothing was stored"
    assert stored >= set(while_full) | {f"msg_filling_{n:04}" for n in range(len(filling) - 1)}
    assert all(answer == (200, "accepted") for answer in after)
    assert ready_after == 200
    if kind == "tmpfs":
        assert ready_while_full == 503
        assert "full" in (readyz_reason or "")


@pytest.mark.slow
def test_readyz_turns_503_when_the_database_cannot_grow(tmp_path: Path, app: Downstream) -> None:
    with in_process(gateway_config(tmp_path, app.url, routes=_users_route(app))) as gw:
        disk = Disk("max_page_count", tmp_path)
        disk.make_full(gw)
        try:
            # Rows that still fit in the last pages are stored; then the database is full.
            answers = [_post(gw, f"msg_cannot_grow_{n:03}") for n in range(200)]
            assert (503, "storage_unavailable") in answers
            assert answers[-1] == (503, "storage_unavailable")
            assert _ready(gw) == 503
        finally:
            disk.free(gw)


# -- read-only under load -------------------------------------------------------------------------------------

# The system calls by which a process changes a file's contents or size; on a read-only file system each one
# fails with EROFS.
_FILE_WRITES = "write,pwrite64,writev,pwritev,pwritev2,ftruncate,fallocate"
# A sync of a file whose writes were all refused has nothing to write: on a read-only ext4 it returns 0
# (fs/ext4/fsync.c), so syncs are traced, not failed. A sync that fails is another fault, after which the
# store refuses everything until a restart, by design (an fsync error may have dropped accepted pages);
# failing the syncs here failed the test whenever a checkpoint synced just after the fault began.
_FILE_SYNCS = "fsync,fdatasync"


def _tracers(pid: int) -> set[int]:
    """The TracerPid of each thread of process pid (0: not traced)."""
    tracers = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("TracerPid:"):
                    tracers.add(int(line.split()[1]))
    return tracers


@contextlib.contextmanager
def read_only_files(pid: int, paths: list[Path], log: Path) -> Iterator[None]:
    """While the block runs, every write, truncation or allocation that process pid (any of its threads)
    makes to one of paths fails with EROFS, as on a file system turned read-only under it (and its syncs,
    with nothing to write, succeed).

    Linux cannot stage this for real and undo it: it refuses `mount -o remount,ro` ("mount point is busy")
    while a process holds files on the mount open for writing, as the gateway holds its database, and the
    read-only remount that ext4 makes itself after an error cannot be undone without unmounting. So strace
    attaches to the running gateway and answers those system calls EROFS itself; detaching ends it."""
    strace = shutil.which("strace")
    if strace is None:
        unavailable("a read-only file system is staged with strace, which is not installed")
    command = [strace, "-qq", "-f", "-p", str(pid), *(f"-P{path}" for path in paths)]
    command += ["-e", f"trace={_FILE_WRITES},{_FILE_SYNCS}", "-e", f"inject={_FILE_WRITES}:error=EROFS"]
    command += ["-o", str(log)]
    tracer = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        # Attached once every thread of the gateway names strace as its tracer.
        wait_until(lambda: tracer.poll() is not None or _tracers(pid) == {tracer.pid}, 10, 0.005)
        if tracer.poll() is not None:
            unavailable(f"strace cannot attach to the gateway: {tracer.communicate()[1].strip()}")
        yield
    finally:
        if tracer.poll() is None:
            tracer.send_signal(signal.SIGINT)  # strace detaches from every thread and exits
            tracer.communicate(timeout=10)
        wait_until(lambda: _tracers(pid) == {0}, 10, 0.005)


@pytest.mark.slow
def test_database_turning_read_only_under_load_answers_503_then_recovers(
    tmp_path: Path, app: Downstream, seed: int
) -> None:
    started = time.monotonic()
    rng = random.Random(seed)
    child = child_gateway(tmp_path, gateway_config(tmp_path, app.url, routes=_users_route(app)))
    db = child.db_path
    files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    events = signed_events(2000, "msg_ro")
    strace_log = tmp_path / "strace.log"
    child.process.start()
    try:
        with httpx.Client(timeout=5) as probe, httpx.Client(timeout=5) as client:
            load = Load(child.url + PATH, events, 8, seed).start()
            with sampler(lambda: probe.get(child.ops_url + "/readyz").status_code, 0.1) as readiness:
                wait_until(lambda: load.done >= 300, 60, 0.01)
                time.sleep(rng.uniform(0, 0.1))
                with read_only_files(child.pid, files, strace_log):
                    read_only_from = time.time()
                    done_before = load.done
                    time.sleep(1.0)
                    readyz_reason = client.get(child.ops_url + "/readyz").json().get("reason")
                    time.sleep(1.0)
                    read_only_until = time.time()
                lifted_at = time.monotonic()
                load.join(120)
            # Service resumed without a restart: the same process serves on.
            wait_until(lambda: set(delivered_keys(app)) >= {e.id for e in events if e.answered_2xx}, 60)
            delivered = set(delivered_keys(app))
            pid_after = child.pid
            assert child.process.terminate(30) == 0
    finally:
        child.process.kill()
    stored = {row[0] for row in read_db(db, "SELECT event_id FROM events")}
    refused_writes = Counter(
        line.split()[1].partition("(")[0] for line in strace_log.read_text().splitlines() if "EROFS" in line
    )

    offset = time.monotonic() - time.time()
    inside = [a for e in events for a in e.history if read_only_from + 0.2 < a[0] < read_only_until]
    ready_inside = {s for at, s in readiness if read_only_from + 0.2 < at - offset < read_only_until}
    ready_after = [s for at, s in readiness if at > lifted_at + 0.5]
    refused = [e for e in events if any(a[2] == "storage_unavailable" for a in e.history)]
    figures = {
        "events_sent": len(events),
        "read_only_s": round(read_only_until - read_only_from, 2),
        "system_calls_refused_erofs": dict(refused_writes),
        "answers_while_read_only": sorted({f"{status} {reason}" for _, status, reason in inside}),
        "requests_while_read_only": len(inside),
        "events_refused_then_retried": len(refused),
        "readyz_while_read_only": sorted(ready_inside),
        "readyz_reason_while_read_only": readyz_reason,
        "readyz_after": sorted(set(ready_after)),
        "answered_2xx": sum(e.answered_2xx for e in events),
        "delivered": len(delivered & {e.id for e in events}),
        "test_s": round(time.monotonic() - started, 1),
    }
    record("read_only", figures, tmp_path)

    assert done_before < len(events), "the load must still be running when the database turns read-only"
    assert refused_writes, "no write of the gateway's was refused: the fault was not staged"
    assert inside and {(status, reason) for _, status, reason in inside} == {(503, "storage_unavailable")}
    assert ready_inside == {503}
    assert ready_after and set(ready_after) == {200}
    assert pid_after == child.pid
    # Refused events were not stored: their retries were accepted, not duplicates.
    assert refused and all(e.outcome == "accepted" for e in refused)
    assert all(e.answered_2xx for e in events)
    assert {e.id for e in events} <= stored
    assert {e.id for e in events} <= delivered


def _mounted(directory: Path) -> tuple[str, str]:
    """The device and the options of the file system mounted on directory ("?" when none is)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[1] == str(directory):
            return fields[0], fields[3]
    return "?", "?"


@contextlib.contextmanager
def ext4_without_journal(directory: Path, size: str) -> Iterator[Path]:
    """A real ext4 file system without a journal, mounted on directory from an image file through a loop
    device with errors=remount-ro: an error makes the kernel itself turn it read-only. Yields the file in
    /sys/fs/ext4 that raises such an error. Needs root and loop devices."""
    directory.mkdir()
    names = ("mount", "umount", "mkfs.ext4", "e2fsck")
    tools = {name: path for name in names if (path := shutil.which(name)) is not None}
    if len(tools) < len(names) or os.geteuid() != 0:
        unavailable(f"an ext4 image needs root and {', '.join(names)}")
    image = directory.with_name(directory.name + ".img")
    with image.open("wb") as file:
        file.truncate(int(size.removesuffix("m")) << 20)
    subprocess.run([tools["mkfs.ext4"], "-q", "-F", "-O", "^has_journal", str(image)], check=True)
    mounted = subprocess.run(
        [tools["mount"], "-o", "loop,errors=remount-ro", str(image), str(directory)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        unavailable(f"cannot mount an ext4 image on a loop device here ({mounted.stderr.strip()})")
    try:
        device = Path(_mounted(directory)[0]).name
        trigger = Path(f"/sys/fs/ext4/{device}/trigger_fs_error")
        if not trigger.exists():
            unavailable(f"{trigger} does not exist: this kernel cannot be asked for an ext4 error")
        yield trigger
    finally:
        if subprocess.run([tools["umount"], str(directory)], capture_output=True).returncode != 0:
            subprocess.run([tools["umount"], "-l", str(directory)], capture_output=True)
        image.unlink()


def _post_to(client: httpx.Client, url: str, msg_id: str) -> tuple[int, str]:
    body, headers = svix_request(data={"id": msg_id}, msg_id=msg_id)
    response = client.post(url, content=body, headers=headers)
    answer = response.json()
    return response.status_code, answer.get("status") or answer.get("error")


@pytest.mark.slow
def test_file_system_the_kernel_turns_read_only_is_answered_503_and_nothing_answered_is_lost(
    tmp_path: Path, app: Downstream
) -> None:
    """The read-only file system of production: ext4 remounts itself read-only after an error. The kernel
    does not let it be made writable again while it is mounted, so recovery here is an operator's: stop
    the gateway, repair, mount, start. Every event answered 2xx before the fault survives it."""
    started = time.monotonic()
    directory = tmp_path / "ext4"
    with ext4_without_journal(directory, "64m") as trigger, httpx.Client(timeout=10) as client:
        child = child_gateway(tmp_path, gateway_config(directory, app.url, routes=_users_route(app)))
        url = child.url + PATH
        child.process.start()
        try:
            before = {
                f"msg_ext4_before_{n:02}": _post_to(client, url, f"msg_ext4_before_{n:02}") for n in range(50)
            }
            trigger.write_text("hookyard reliability test: turn read-only\n")
            options = _mounted(directory)[1]
            while_read_only = {
                f"msg_ext4_ro_{n:02}": _post_to(client, url, f"msg_ext4_ro_{n:02}") for n in range(30)
            }
            readyz = client.get(child.ops_url + "/readyz")
            healthz_answer = client.get(child.ops_url + "/healthz")
            healthz = healthz_answer.status_code
            stopped = child.process.terminate(30)
        finally:
            child.process.kill()
        # The operator's part: unmount, repair, mount again.
        assert subprocess.run(["umount", str(directory)], capture_output=True).returncode == 0
        image = directory.with_name(directory.name + ".img")
        repaired = subprocess.run(["e2fsck", "-f", "-y", str(image)], capture_output=True, text=True)
        assert repaired.returncode in (0, 1), repaired.stdout + repaired.stderr
        mount = ["mount", "-o", "loop,errors=remount-ro", str(image), str(directory)]
        assert subprocess.run(mount, capture_output=True).returncode == 0
        child.process.start()
        try:
            retried = {msg_id: _post_to(client, url, msg_id) for msg_id in while_read_only}
            expected = set(before) | set(retried)
            wait_until(lambda: set(delivered_keys(app)) >= expected, 30)
            ready_after = client.get(child.ops_url + "/readyz").status_code
            assert child.process.terminate(30) == 0
        finally:
            child.process.kill()
        stored = {row[0] for row in read_db(child.db_path, "SELECT event_id FROM events")}
    figures = {
        "mount_options_after_the_error": options,
        "answers_before": sorted({f"{status} {reason}" for status, reason in before.values()}),
        "requests_while_read_only": len(while_read_only),
        "answers_while_read_only": sorted({f"{s} {r}" for s, r in while_read_only.values()}),
        "readyz_while_read_only": f"{readyz.status_code} {readyz.json().get('reason')}",
        "healthz_while_read_only": healthz,
        "gateway_exit_status_on_sigterm": stopped,
        "e2fsck_exit_status": repaired.returncode,
        "answers_to_retries_after_repair": sorted({f"{s} {r}" for s, r in retried.values()}),
        "readyz_after": ready_after,
        "delivered": len(set(delivered_keys(app)) & expected),
        "test_s": round(time.monotonic() - started, 1),
    }
    record("read_only_kernel", figures, tmp_path)

    assert set(before.values()) == {(200, "accepted")}
    assert set(while_read_only.values()) == {(503, "storage_unavailable")}
    assert readyz.status_code == 503
    # Liveness fails only when the store refuses every write until a restart (here: when SQLite's own
    # checkpoint hit the read-only file system first, which depends on timing), and then says why.
    if "restart hookyard to recover" in readyz.json()["reason"]:
        assert healthz == 503 and "restart hookyard" in healthz_answer.json()["reason"]
    else:
        assert healthz == 200
    # What was answered 2xx before the fault is still there after it; what was refused was not stored.
    assert set(retried.values()) == {(200, "accepted")}, "a 503 must mean nothing was stored"
    assert stored == expected
    assert ready_after == 200


async def _through_ingress(ingress: Any, body: bytes, headers: dict[str, str]) -> int:
    """One request through the webhook listener's ASGI app, as uvicorn would pass it; its status. An
    exception raised here is what uvicorn turns into a bare 500."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": PATH,
        "headers": [(name.encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 40000),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await ingress(scope, receive, send)
    return int(sent[0]["status"])


@pytest.mark.slow
def test_webhooks_sharing_a_batch_with_a_failing_write_get_503_not_500(
    tmp_path: Path, app: Downstream
) -> None:
    with in_process(gateway_config(tmp_path, app.url, routes=_users_route(app))) as gw:
        storage = gw.gateway.storage
        requests = [svix_request(msg_id=f"msg_same_batch_{n}") for n in range(4)]

        async def same_batch() -> list[Any]:
            # Submitted in one loop iteration, so they form one batch: the database turns read-only in
            # the middle of it, as a statement-level failure would.
            return await asyncio.gather(
                storage._run(lambda conn: conn.execute("PRAGMA query_only = ON")),  # type: ignore[attr-defined]
                *(_through_ingress(gw.gateway.ingress, body, headers) for body, headers in requests),
                return_exceptions=True,
            )

        try:
            _pragma, *answers = _run(gw, same_batch())
        finally:
            _between_transactions(gw, "PRAGMA query_only = OFF")
        assert answers == [503] * len(requests), answers


# -- PostgreSQL down ------------------------------------------------------------------------------------------


def _pg_rows(url: str, table: str) -> list[tuple[str, int]]:
    async def fetch() -> list[tuple[str, int]]:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(f'SELECT event_id, count(*) AS n FROM "{table}" GROUP BY event_id')
            return [(row["event_id"], row["n"]) for row in rows]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def _pg_drop(url: str, table: str) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        finally:
            await conn.close()

    asyncio.run(drop())


def _states(db: Path, action: str) -> dict[str, int]:
    return dict(
        read_db(db, "SELECT state, count(*) FROM deliveries WHERE action = ? GROUP BY state", (action,))
    )


@pytest.mark.slow
def test_postgres_down_only_the_store_retries_and_rows_land_once(
    tmp_path: Path, app: Downstream, postgres_url: str, seed: int
) -> None:
    started = time.monotonic()
    rng = random.Random(seed)
    parts = urlsplit(postgres_url)
    table = f"hookyard_rel_{uuid.uuid4().hex[:12]}"
    db = tmp_path / "hookyard.db"
    events = signed_events(600, "msg_pg")
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        user = parts.netloc.rpartition("@")[0]
        through_proxy = parts._replace(
            netloc=f"{user}@127.0.0.1:{proxy.port}" if user else f"127.0.0.1:{proxy.port}"
        )
        store = {
            "id": "db",
            "use": "store",
            "timeout": "2s",
            "retry": {"schedule": ["200ms"] * 150, "jitter": 0},
            "with": {"url": through_proxy.geturl(), "table": table},
        }
        config = gateway_config(tmp_path, app.url, routes=_users_route(app, store))
        try:
            with in_process(config) as gw:
                load = Load(gw.url + PATH, events, 8, seed).start()
                wait_until(lambda: load.done >= 150, 60, 0.01)
                time.sleep(rng.uniform(0, 0.1))
                proxy.cut()  # mid-load: some INSERTs are in flight
                cut_at = time.monotonic()
                load.join(120)
                answered = {e.id for e in events if e.answered_2xx}
                # The forward action of the same events is not held up by the store being down.
                wait_until(lambda: set(delivered_keys(app, "/app")) >= answered, 30)
                app_done_s = time.monotonic() - cut_at
                wait_until(lambda: _states(db, "db").get("pending", 0) > 0, 10)
                store_while_down = _states(db, "db")
                retried_while_down = read_db(
                    db,
                    "SELECT count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id "
                    "WHERE d.action = 'db' AND a.outcome = 'retry'",
                )[0][0]
                time.sleep(max(0.0, 3.0 - (time.monotonic() - cut_at)))
                proxy.restore()
                restored_at = time.monotonic()
                wait_until(lambda: _states(db, "db") == {"delivered": len(answered)}, 60, 0.2)
                store_caught_up_s = time.monotonic() - restored_at
            rows = _pg_rows(postgres_url, table)
        finally:
            _pg_drop(postgres_url, table)
    # Only the store retried: every forward to the app was delivered at its first attempt, and the app got
    # each event exactly once.
    forward_attempts = dict(
        read_db(
            db,
            "SELECT n, count(*) FROM (SELECT count(a.id) AS n FROM deliveries d "
            "LEFT JOIN attempts a ON a.delivery_id = d.id WHERE d.action = 'app' GROUP BY d.id) GROUP BY n",
        )
    )
    forward_states = _states(db, "app")
    app_requests = Counter(delivered_keys(app, "/app"))
    figures = {
        "events_sent": len(events),
        "answered_2xx": len(answered),
        "outage_s": round(restored_at - cut_at, 2),
        "forward_all_delivered_after_cut_s": round(app_done_s, 2),
        "store_deliveries_while_down": store_while_down,
        "store_retries_while_down": retried_while_down,
        "store_caught_up_after_restore_s": round(store_caught_up_s, 2),
        "forward_attempts_per_delivery": forward_attempts,
        "forward_requests": sum(app_requests.values()),
        "rows": len(rows),
        "rows_more_than_once": sum(n > 1 for _, n in rows),
        "test_s": round(time.monotonic() - started, 1),
    }
    record("postgres_down", figures, tmp_path)

    assert answered == {e.id for e in events}
    assert store_while_down.get("pending", 0) > 0 and retried_while_down > 0
    assert store_while_down.get("dead", 0) == 0
    assert {event_id for event_id, _ in rows} == answered
    assert all(n == 1 for _, n in rows)
    assert forward_states == {"delivered": len(answered)}
    assert forward_attempts == {1: len(answered)}, "a forward was retried although only the store failed"
    assert set(app_requests) == answered and set(app_requests.values()) == {1}
