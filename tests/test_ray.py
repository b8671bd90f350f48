"""`--engine ray`: the same job on a real Ray cluster of this machine, under one rate budget (issue 15).

One two-node cluster (`ray start --head` plus `ray start --address=...`, both on loopback: see
tests/ray_cluster.py) serves the module; the last test kills its second node. Every run talks HTTP
to the bundled endpoint, and the assertions read what the server saw and the Parquet written.
The tests of the limiter's additions and of the one-line errors need no cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SAMPLES, distinct_copies, latest_rows, read_rows, run_main
from pipeline.engine.limits import AdaptiveConcurrency, Limiter
from pipeline.localserver import LocalServer

from ray_cluster import LoopbackCluster

SECRET_KEY = "sk-ray-test-7f3a9c21d4e85b60"  # must never appear in a log, a row or Ray's session files


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on loopback (127.0.0.2 head, 127.0.0.3), this module's environment set for Ray."""
    ray = pytest.importorskip("ray", reason="--engine ray needs Ray: pip install 'caption[ray]' (CI installs it)")
    with LoopbackCluster() as started:
        started.add_node()
        saved = {name: os.environ.get(name) for name in ("HOME", "RAY_USAGE_STATS_ENABLED",
                                                          "RAY_USAGE_STATS_REPORT_URL")}
        os.environ.update({name: started.env[name] for name in saved})
        try:
            yield started
        finally:
            if ray.is_initialized():
                ray.shutdown()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture
def keyed_server():
    """A bundled endpoint that answers only requests carrying SECRET_KEY."""
    server = LocalServer("127.0.0.1", 0, api_key=SECRET_KEY)
    server.start()
    yield server
    server.stop()


def _photos(folder: Path, count: int) -> Path:
    """`count` different files (other bytes, the same picture) of a real JPEG."""
    return distinct_copies(folder, "chelsea_the_cat.jpg", [f"cat_{i:03d}.jpg" for i in range(count)])


def _ray_run(cluster: LoopbackCluster, server: LocalServer, folder: Path, out: Path, job: Path, *flags) -> int:
    return run_main("run", folder, "--job", job, "--out", out, "--base-url", server.base_url, "--no-progress",
                    "--engine", "ray", "--ray-address", cluster.address, *flags)


def _ok_rows_per_image(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in read_rows(out):
        if row["status"] == "ok":
            counts[row["image_path"]] = counts.get(row["image_path"], 0) + 1
    return counts


# --- the same job, the same rows -----------------------------------------------------------------


def test_ray_run_writes_the_rows_an_online_run_writes_under_one_budget_and_keeps_the_key_out(
        cluster, keyed_server, tmp_path, write_job, capfd, monkeypatch):
    # The server takes 2 requests in flight and 4 a second; the job says 2 and 3 (a request granted
    # by the budget reaches the server a few ms later, not always the same few). Two request actors,
    # one budget: were the budget per actor, each would allow 2 in flight and 3 a second, 4 and 6
    # together, and the server would answer 429s.
    folder = _photos(tmp_path / "in", 12)
    for name in ("coffee_cup.jpg", "transparent_logo.png", "corrupt.jpg"):
        (folder / name).write_bytes((SAMPLES / name).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    monkeypatch.setenv("RAY_TEST_KEY", SECRET_KEY)
    job = write_job(tmp_path / "job.toml", endpoint_api_key_env="RAY_TEST_KEY", limits_concurrency=2,
                    limits_rps=3)
    online = run_main("run", folder, "--job", job, "--out", tmp_path / "online", "--base-url",
                      keyed_server.base_url, "--no-progress")
    keyed_server.reset()
    keyed_server.set_latency(0.3)
    keyed_server.rate_limit(concurrency=2, rps=4)

    code = _ray_run(cluster, keyed_server, folder, tmp_path / "ray", job, "--ray-actors", "2")

    assert code == online == 1  # corrupt.jpg is an error row in both
    mine, theirs = latest_rows(tmp_path / "ray"), latest_rows(tmp_path / "online")
    assert sorted(mine) == sorted(theirs) and len(mine) == 15
    same = ("status", "error_kind", "caption", "image_sha256", "width", "height", "sent_width", "sent_height",
            "prompt_tokens", "completion_tokens", "mode", "job_fingerprint", "model")
    for path, row in mine.items():
        assert {k: row[k] for k in same} == {k: theirs[path][k] for k in same}, path
    assert _ok_rows_per_image(tmp_path / "ray") == {name: 1 for name in mine if name != "corrupt.jpg"}

    seen = keyed_server.observed()
    assert len(seen) == 14 and [o.status for o in seen] == [200] * 14, [o.fault for o in seen if o.status != 200]
    assert all(o.authorized for o in seen)
    assert seen[-1].t - seen[0].t >= (14 - 3) / 3 * 0.9  # a bucket of 3 a second, starting full, goes no faster

    printed = capfd.readouterr()
    assert printed.out.count("14 ok, 1 error") == 2  # online, then ray
    assert "passed over: 1 not an image file" in printed.out
    assert SECRET_KEY[:8] not in printed.out + printed.err
    for path in cluster.dir.rglob("*"):  # Ray's own session logs, of every node and worker
        if path.is_file() and not path.is_symlink():
            assert SECRET_KEY[:8].encode() not in path.read_bytes(), path


# --- faults --------------------------------------------------------------------------------------


def _kill_when(condition, action, finished: threading.Event) -> threading.Thread:
    """A thread that runs `action` once `condition()` holds, unless the run has `finished` first."""
    def watch():
        while not finished.is_set():
            if condition():
                action()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _descendants(root: int, title: str) -> list[int]:
    """PIDs below process `root` (a node this cluster started) whose process title starts with `title`
    (Ray's workers each lead a session of their own, so the parent links are what ties them to a node)."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def below(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False

    return [pid for pid, text in titles.items() if text.startswith(title) and below(pid)]


def test_the_driver_killed_resumes_with_the_same_command(cluster, server, tmp_path, write_job, cli):
    folder = _photos(tmp_path / "in", 40)
    server.set_latency(0.3)
    job = write_job(tmp_path / "job.toml", limits_concurrency=2)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "pipeline", "run", str(folder), "--job", str(job), "--out", str(out),
            "--base-url", server.base_url, "--no-progress", "--engine", "ray", "--ray-address", cluster.address]
    driver = subprocess.Popen(argv, cwd=ROOT, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def journalled() -> int:  # rows durable so far: journal lines, and those already rolled into parts
        rows = sum(len(p.read_bytes().splitlines()) for p in out.glob("_journal-*.jsonl"))
        for part in out.glob("part-*.parquet"):
            with contextlib.suppress(OSError, pa.ArrowException):  # a part being renamed into place
                rows += pq.ParquetFile(part).metadata.num_rows
        return rows

    deadline = time.monotonic() + 90
    while journalled() < 6 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.poll() is None, driver.stderr.read().decode(errors="replace")[-2000:]  # mid-run
    driver.kill()  # kill -9, between two rows or in the middle of one
    driver.wait()
    assert journalled() >= 6

    resumed = cli(*argv[3:])  # the same command, in this process this time
    assert resumed.code == 0, resumed.err[-2000:]
    assert "already done" in resumed.out and " 0 already done" not in resumed.out
    assert _ok_rows_per_image(out) == {f"cat_{i:03d}.jpg": 1 for i in range(40)}


def test_a_table_with_keep_columns_runs_on_the_cluster_with_its_columns(cluster, server, tmp_path, write_job):
    """A Parquet table as INPUT: the cluster's rows carry the kept columns with the input's types,
    bad rows included, as an online run's do."""
    folder = _photos(tmp_path / "in", 4)
    (folder / "corrupt.jpg").write_bytes((SAMPLES / "corrupt.jpg").read_bytes())
    names = sorted(p.name for p in folder.iterdir())
    pq.write_table(pa.table({"file": [str(folder / n) for n in names], "id": list(range(len(names)))}),
                   tmp_path / "t.parquet")
    job = write_job(tmp_path / "job.toml", limits_max_attempts=2)
    job.write_text(job.read_text() + '\n[input]\npath_column = "file"\nkeep_columns = ["id"]\n')
    assert _ray_run(cluster, server, tmp_path / "t.parquet", tmp_path / "out", job) == 1
    rows = {r["image_path"]: r for r in read_rows(tmp_path / "out")}
    assert {key: row["id"] for key, row in rows.items()} == {str(folder / n): i for i, n in enumerate(names)}
    assert rows[str(folder / "corrupt.jpg")]["status"] == "error"
    assert {pq.read_schema(p).field("id").type for p in (tmp_path / "out").glob("part-*.parquet")} == {pa.int64()}


def test_a_request_actor_then_a_node_killed_mid_run_cost_no_image_and_no_second_ok_row(
        cluster, server, tmp_path, write_job):
    """Last in the module: it takes the cluster's second node away."""
    folder = _photos(tmp_path / "in", 40)
    server.set_latency(0.4)
    job = write_job(tmp_path / "job.toml", limits_concurrency=4)
    killed: list[int] = []
    worker_node = cluster.nodes[1]

    def kill_one_requester():
        for node in cluster.nodes:
            for pid in _descendants(node.pid, "ray::MapWorker(MapBatches(Requester))")[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return

    finished = threading.Event()
    watchers = [_kill_when(lambda: len(server.observed()) >= 6, kill_one_requester, finished),
                _kill_when(lambda: len(server.observed()) >= 16, lambda: cluster.kill_node(worker_node), finished)]
    code = _ray_run(cluster, server, folder, tmp_path / "out", job, "--ray-actors", "2")
    finished.set()
    for watcher in watchers:
        watcher.join()

    assert killed, "no request actor was found to kill"
    assert worker_node.poll() is not None
    assert code == 0
    assert _ok_rows_per_image(tmp_path / "out") == {f"cat_{i:03d}.jpg": 1 for i in range(40)}


# --- no cluster needed ---------------------------------------------------------------------------


def test_without_ray_installed_engine_ray_names_the_extra(cli, tmp_path, write_job, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    folder = _photos(tmp_path / "in", 1)
    ran = cli("run", folder, "--job", write_job(tmp_path / "job.toml"), "--out", tmp_path / "out", "--engine", "ray")
    assert ran.code == 2
    assert "--engine ray needs the Python package ray" in ran.err and "pip install 'caption[ray]'" in ran.err


@pytest.mark.parametrize("flag, words", [(["--mode", "batch"], "batch mode"), (["--dedupe-near"], "[dedupe] near")],
                         ids=["batch", "near-dedupe"])
def test_what_a_cluster_run_does_not_do_is_refused_before_anything_is_sent(cli, tmp_path, write_job, flag, words):
    folder = _photos(tmp_path / "in", 1)
    ran = cli("run", folder, "--job", write_job(tmp_path / "job.toml"), "--out", tmp_path / "out",
              "--engine", "ray", *flag)
    assert ran.code == 2 and words in ran.err


def test_expired_permits_free_their_slots():
    concurrency = AdaptiveConcurrency(4)
    old, new = concurrency.admit(10, now=100.0), concurrency.admit(10, now=150.0)
    assert concurrency.expired(30.0, now=160.0) == [old]
    assert concurrency.count == 1 and concurrency.expired(30.0, now=160.0) == []
    concurrency.release(new)


@pytest.mark.parametrize("in_flight, rpm, expect", [(0, None, True), (2, None, False), (0, 1, False)],
                         ids=["room", "slots-full", "bucket-empty"])
def test_try_acquire_gives_a_permit_only_when_one_may_go_now(in_flight, rpm, expect):
    async def scenario():
        limiter = Limiter(2, rpm=rpm)
        for _ in range(in_flight):
            await limiter.acquire(10)
        if rpm:
            await limiter.acquire(10)  # the one request a minute
        return limiter.try_acquire(10)

    assert (asyncio.run(scenario()) is not None) is expect


def test_the_permits_of_a_request_actor_gone_silent_are_freed_for_the_others(monkeypatch):
    from pipeline.engine import ray_budget
    from pipeline.job import Limits

    monkeypatch.setattr(ray_budget, "HEARTBEAT_S", 0.05)  # the reaper's beat, shortened for the test
    monkeypatch.setattr(ray_budget, "SENDER_SILENCE_S", 0.3)

    async def scenario():
        budget = ray_budget.ClusterBudget(Limits(concurrency=2))
        held = await budget.acquire("killed", [(10, 0, "m"), (10, 0, "m"), (10, 0, "m")])
        assert len(held) == 2  # the in-flight limit: the third may not go
        stale = asyncio.ensure_future(budget.acquire("killed", [(10, 0, "m")]))  # outlives its caller, first in line
        waiting = asyncio.ensure_future(budget.acquire("alive", [(10, 0, "m")]))

        async def beat():  # what the live actor's broker does
            while True:
                await budget.heartbeat("alive")
                await asyncio.sleep(0.05)

        beating = asyncio.ensure_future(beat())
        await asyncio.sleep(0.1)
        assert not waiting.done()  # "killed" is still within its silence allowance
        try:
            return await asyncio.wait_for(stale, 5), await asyncio.wait_for(waiting, 5)
        finally:
            beating.cancel()

    stale, granted = asyncio.run(scenario())
    assert stale == [] and len(granted) == 1  # the dead caller's late permit went back at once
