"""Batch mode over loopback: the bundled server's Files and Batches APIs, the driver, kill -9 in each window."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pyarrow.parquet as pq
import pytest

from conftest import DEMO_JOB, EXPECTED_SCHEMA, ROOT, copy_samples, latest_rows, read_rows
from pipeline.engine.batch import CRASH_ENV
from pipeline.engine.batch.collect import poll_waits
from pipeline.engine.batch.lines import result_lines
from pipeline.job import Job
from pipeline.providers.openai import OpenAIBatchBackend, OpenAIProvider

GOOD = ["astronaut_eileen_collins.jpg", "brick_wall_grey.jpg", "chelsea_the_cat.jpg", "coffee_cup.jpg",
        "hubble_deep_field.jpg"]


@pytest.fixture
def folder(sample_folder) -> Path:
    return sample_folder(GOOD)


def _argv(folder: Path, out: Path, server, *flags: str) -> list[str]:
    return ["run", str(folder), "--job", str(DEMO_JOB), "--out", str(out),
            "--base-url", server.base_url, "--mode", "batch", "--batch-poll-s", "0.02", "--retry-base-s", "0.01",
            "--max-side", "256", "--no-progress", *flags]


def _ok_paths(out: Path) -> list[str]:
    return sorted(r["image_path"] for r in read_rows(out) if r["status"] == "ok")


def _chunks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_batch").glob("chunk-*.json"))]


def test_two_chunks_end_to_end_rows_like_online(server, folder, tmp_path, cli):
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, "--batch-max-requests", "2")).code == 0
    rows = read_rows(out)
    assert sorted(r["image_path"] for r in rows) == sorted(GOOD)
    assert {r["mode"] for r in rows} == {"batch"} and {r["status"] for r in rows} == {"ok"}
    assert all(r["caption"] and r["request_id"] and r["total_tokens"] and r["sent_width"] for r in rows)
    parts = list(out.glob("part-*.parquet"))
    assert parts and all(pq.read_schema(p).equals(EXPECTED_SCHEMA) for p in parts)
    seen = server.batches()
    assert [b.lines for b in seen] == [2, 2, 1]  # three chunks, one batch each
    assert len({b.metadata["caption_chunk"] for b in seen}) == 3
    assert [c["state"] for c in _chunks(out)] == ["collected"] * 3
    assert not list((out / "_batch").glob("chunk-*[0-9].jsonl"))  # request files go once collected
    again = cli(*_argv(folder, out, server))
    assert again.code == 0  # again: nothing left to send
    assert len(server.batches()) == 3
    assert "5 already done" in again.out


def test_shuffled_output_is_matched_by_custom_id(server, folder, tmp_path, cli):
    online, batch = tmp_path / "online", tmp_path / "batch"
    assert cli("run", folder, "--job", DEMO_JOB, "--out", online, "--base-url", server.base_url, "--max-side", "256",
               "--no-progress").code == 0
    server.shuffle_batch_output(True)
    assert cli(*_argv(folder, batch, server)).code == 0
    captions = {r["image_path"]: r["caption"] for r in read_rows(online)}
    assert {r["image_path"]: r["caption"] for r in read_rows(batch)} == captions
    assert len(set(captions.values())) == len(GOOD)  # distinct answers, so a mix-up would show


@pytest.mark.parametrize(
    ("outcome", "run_lines", "resent"),
    [("expired", 2, 3), ("cancelled", 2, 3)],
    ids=["expired-keeps-completed", "cancelled-keeps-completed"],
)
def test_batch_that_did_not_finish_is_resubmitted(server, folder, tmp_path, outcome, run_lines, resent, cli):
    server.fail_next_batch(outcome, run_lines=run_lines)
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server)).code == 0
    assert [b.lines for b in server.batches()] == [5, resent]
    assert [b.status for b in server.batches()] == [outcome, "completed"]
    rows = read_rows(out)
    assert sorted(r["image_path"] for r in rows) == sorted(GOOD)  # one row each: kept ones not redone
    assert sorted(r["attempts"] for r in rows) == [1] * (5 - resent) + [2] * resent


def test_400_line_is_an_error_row_and_not_resent(server, folder, tmp_path, cli):
    server.fail_batch_lines("400")
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server)).code == 1
    rows = read_rows(out)
    errors = [r for r in rows if r["status"] == "error"]
    assert len(rows) == 5 and len(errors) == 1
    assert errors[0]["error_kind"] == "bad_request" and errors[0]["mode"] == "batch"
    assert len(server.batches()) == 1


def test_transient_line_is_resent_in_a_later_chunk(server, folder, tmp_path, cli):
    server.fail_batch_lines("500")
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server)).code == 0
    assert [b.lines for b in server.batches()] == [5, 1]
    assert sorted(r["attempts"] for r in read_rows(out)) == [1, 1, 1, 1, 2]


def test_transient_line_ends_as_error_row_when_attempts_run_out(server, folder, tmp_path, cli):
    server.fail_batch_lines("503", times=2)
    server.shuffle_batch_output(False)
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, "--max-attempts", "1", "--batch-max-requests", "1")).code == 1
    kinds = sorted(r["error_kind"] or "ok" for r in read_rows(out))
    assert kinds == ["ok", "ok", "ok", "transient", "transient"]
    assert len(server.batches()) == 5


def _start(folder: Path, out: Path, server, crash_at: str) -> subprocess.CompletedProcess:
    env = {**os.environ, CRASH_ENV: crash_at}
    argv = [sys.executable, "-m", "pipeline", *_argv(folder, out, server, "--batch-max-requests", "2")]
    return subprocess.run(argv, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("step", ["writing", "uploaded", "created", "polling", "collecting"])
def test_kill9_in_each_window_then_rerun_submits_each_chunk_once(server, folder, tmp_path, step, cli):
    server.set_batch_delay(0.1)
    out = tmp_path / "out"
    crashed = _start(folder, out, server, step)
    assert crashed.returncode == 137, crashed.stderr
    assert cli(*_argv(folder, out, server, "--batch-max-requests", "2")).code == 0
    chunks = _chunks(out)
    seen = server.batches()
    assert len(seen) == len(chunks) == 3  # exactly one batch per chunk
    assert sorted(b.metadata["caption_chunk"] for b in seen) == sorted(
        f"{json.loads((out / '_batch' / '_run.json').read_text())['run_id']}/{c['name']}" for c in chunks)
    assert {c["batch_id"] for c in chunks} == {b.id for b in seen}
    rows = read_rows(out)
    assert sorted(r["image_path"] for r in rows) == sorted(GOOD)  # one row each, none twice
    assert _ok_paths(out) == sorted(GOOD)


def test_detach_then_status_then_collect(server, folder, tmp_path, cli):
    server.set_batch_delay(0.3)
    out = tmp_path / "out"
    code, printed, _ = cli(*_argv(folder, out, server, "--batch-max-requests", "3", "--detach"))
    assert code == 0
    assert "2 batches are with the provider" in printed and "caption batch collect" in printed
    assert not list(out.glob("part-*.parquet"))
    code, status, _ = cli("batch", "status", out)
    assert code == 0
    assert status.count("submitted") == 2 and "in_progress" in status
    time.sleep(0.5)
    assert cli("batch", "collect", str(out)).code == 0
    assert _ok_paths(out) == sorted(GOOD)
    assert len(server.batches()) == 2


def test_cancel_then_collect_resends_what_did_not_run(server, folder, tmp_path, cli):
    server.set_batch_delay(30)
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, "--detach")).code == 0
    code, printed, _ = cli("batch", "cancel", out)
    assert code == 0
    assert "asked to cancel 1 batches" in printed
    deadline = time.monotonic() + 5
    while server.batches()[0].status != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.set_batch_delay(0)
    assert cli("batch", "collect", str(out)).code == 0  # collects the cancelled one, submits the rest anew
    assert [b.lines for b in server.batches()] == [5, 5]
    time.sleep(0.2)
    assert cli("batch", "collect", str(out)).code == 0
    assert _ok_paths(out) == sorted(GOOD)


def test_detach_against_the_in_process_endpoint_is_refused(folder, tmp_path, cli):
    code, _, err = cli("run", folder, "--job", DEMO_JOB, "--out", tmp_path / "o", "--mode", "batch", "--detach")
    assert code == 2 and "--detach needs an endpoint" in err


def _backend(session: aiohttp.ClientSession, base_url: str) -> OpenAIBatchBackend:
    provider = OpenAIProvider(Job(), base_url, api_key=None, headers={})
    return OpenAIBatchBackend(session, provider, base_url, api_key=None, headers={}, timeout_s=10)


async def _run_by_hand(base_url: str, requests: Path, dest: Path) -> None:
    """Upload a prepared file, wait for its batch, download its output (as a user would by hand)."""
    async with aiohttp.ClientSession() as session:
        api = _backend(session, base_url)
        batch = await api.submit(await api.upload(requests), {}, "24h")
        while not batch.ended:
            await asyncio.sleep(0.02)
            batch = await api.poll(batch.id)
        await api.download(batch.result_files[0], dest)


def test_prepare_writes_request_files_and_ingest_turns_outputs_into_rows(server, folder, tmp_path, cli):
    dest, out = tmp_path / "requests", tmp_path / "out"
    job = DEMO_JOB
    assert cli("batch", "prepare", folder, "--job", job, "--dest", dest, "--batch-max-requests", "3").code == 0
    files = sorted(dest.glob("requests-*[0-9].jsonl"))
    assert len(files) == 2
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(GOOD)
    assert {(line["method"], line["url"]) for line in lines} == {("POST", "/v1/chat/completions")}
    assert all("stream" not in line["body"] for line in lines)
    outputs = [tmp_path / f"out-{i}.jsonl" for i in range(len(files))]
    for requests, output in zip(files, outputs):
        asyncio.run(_run_by_hand(server.base_url, requests, output))
    assert cli("batch", "ingest", out, *outputs, "--job", job, "--prepared", dest).code == 0
    rows = read_rows(out)
    assert sorted(r["image_path"] for r in rows) == sorted(GOOD)
    assert all(r["mode"] == "batch" and r["image_sha256"] and r["caption"] for r in rows)


async def _other_clients_batches(base_url: str, requests: Path, count: int) -> None:
    """`count` batches that another client creates, with metadata of its own."""
    requests.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                                    "body": {"model": "m", "messages": []}}) + "\n")
    async with aiohttp.ClientSession() as session:
        api = _backend(session, base_url)
        file_id = await api.upload(requests)
        for i in range(count):
            await api.submit(file_id, {"n": str(i)}, "24h")


def test_a_batch_created_before_a_kill_is_found_past_the_first_page_of_the_list(server, folder, tmp_path, cli,
                                                                                 monkeypatch):
    # kill -9 right after chunk 1's batch was created, before it was recorded; then another client
    # creates three batches. The rerun must find chunk 1's batch by its metadata, reading the
    # provider's list (newest first, two a page here) past the other three, and not create it again.
    server.set_batch_delay(0.1)
    out = tmp_path / "out"
    crashed = _start(folder, out, server, "created")
    assert crashed.returncode == 137, crashed.stderr
    (lost,) = server.batches()
    asyncio.run(_other_clients_batches(server.base_url, tmp_path / "other.jsonl", 3))
    others = [b.id for b in server.batches()[1:]]
    monkeypatch.setattr("pipeline.providers.openai.batch.LIST_PAGE", 2)
    pages, list_page = [], OpenAIBatchBackend.list_page

    async def spy(api, after):
        page = await list_page(api, after)
        pages.append((after, [b["id"] for b in page["data"]]))
        return page

    monkeypatch.setattr(OpenAIBatchBackend, "list_page", spy)
    assert cli(*_argv(folder, out, server, "--batch-max-requests", "2")).code == 0
    # Looking for chunk 1's batch: the newest two, then from the last of those on, where it is found.
    assert pages[:2] == [(None, [others[2], others[1]]), (others[1], [others[0], lost.id])]
    mine = [b for b in server.batches() if "caption_chunk" in b.metadata]
    chunks = _chunks(out)
    assert len(mine) == len(chunks) == 3  # one batch per chunk: the lost one was not created twice
    assert chunks[0]["batch_id"] == lost.id and {c["batch_id"] for c in chunks} == {b.id for b in mine}
    assert sorted(r["image_path"] for r in read_rows(out)) == sorted(GOOD)  # one row each, none twice
    assert _ok_paths(out) == sorted(GOOD)
    assert [b.metadata for b in server.batches() if b.id in others] == [{"n": "0"}, {"n": "1"}, {"n": "2"}]


def test_reasoning_model_lines_are_resent_with_max_completion_tokens(server, folder, tmp_path, cli):
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, "--model", "local-reasoning-mini", "--batch-max-requests", "2")).code == 0
    rows = read_rows(out)
    assert sorted(r["image_path"] for r in rows) == sorted(GOOD) and {r["status"] for r in rows} == {"ok"}
    assert all(r["reasoning_tokens"] for r in rows)
    assert (out / "_batch" / "_token_param").read_text() == "max_completion_tokens"
    # All three chunks went out before the first came back refused; each line was sent once more.
    assert [b.lines for b in server.batches()] == [2, 2, 1, 2, 2, 1]
    assert {r["attempts"] for r in rows} == {2}


def test_a_failed_poll_after_a_collection_does_not_collect_it_again(server, folder, tmp_path, cli):
    # Chunk 1 ends and is collected; polling chunk 2 then fails once: the next pass must not
    # collect chunk 1 a second time.
    server.set_batch_delay(0.05)
    server.fail_ended_retrieves(1, after=1)
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, "--batch-max-requests", "3")).code == 0
    rows = read_rows(out)
    assert sorted(r["image_path"] for r in rows) == sorted(GOOD)  # one row each, none twice


def test_an_online_run_waits_for_live_batches_instead_of_paying_twice(server, folder, tmp_path, cli):
    out = tmp_path / "out"
    server.set_batch_delay(60)
    assert cli(*_argv(folder, out, server, "--detach")).code == 0
    online = [a for a in _argv(folder, out, server) if a not in ("--mode", "batch")]
    code, _, err = cli(*online)
    assert code == 2
    assert "still with the provider" in err
    assert server.observed() == []  # no chat request was sent


def test_a_batch_that_fails_validation_stops_the_run_and_is_resent_later(server, folder, tmp_path, cli):
    out = tmp_path / "out"
    server.fail_next_batch("failed")
    code, _, err = cli(*_argv(folder, out, server))
    assert code == 3
    assert "failed validation" in err and len(server.batches()) == 1  # not resubmitted in a loop
    assert not list(out.glob("part-*.parquet")) or not read_rows(out)  # no image was charged an error row
    assert cli(*_argv(folder, out, server)).code == 0  # the next run sends them again
    assert _ok_paths(out) == sorted(GOOD) and len(server.batches()) == 2


def test_a_batch_the_provider_lost_is_sent_again(server, folder, tmp_path, cli):
    out = tmp_path / "out"
    server.set_batch_delay(60)
    assert cli(*_argv(folder, out, server, "--detach")).code == 0
    server.reset()  # the provider forgets every batch (as the bundled server does when it restarts)
    code, _, err = cli(*_argv(folder, out, server))
    assert code == 0
    assert _ok_paths(out) == sorted(GOOD)
    assert "is gone" in err


def test_another_jobs_finished_chunks_do_not_end_this_jobs_images(server, folder, tmp_path, cli):
    out = tmp_path / "out"
    server.fail_batch_lines("400", times=len(GOOD))  # the first job's requests are all refused
    assert cli(*_argv(folder, out, server)).code == 1
    assert cli(*_argv(folder, out, server)).code == 0  # the same job does not send its 400s again
    assert len(server.batches()) == 1
    fixed = _argv(folder, out, server, "--max-side", "128", "--allow-job-change")
    assert cli(*fixed).code == 0  # a changed job asks for its own answers
    assert _ok_paths(out) == sorted(GOOD) and len(server.batches()) == 2


def test_a_full_provider_queue_waits_for_a_live_batch_instead_of_stopping(server, folder, tmp_path, cli):
    out = tmp_path / "out"
    server.set_batch_delay(0.3)
    server.fail_next_batch("expired", run_lines=1)  # chunk 1: slow, and partly done
    server.fail_next_batch("queue_full")  # chunk 2: refused, the queue is full
    code, _, err = cli(*_argv(folder, out, server, "--batch-max-requests", "3"))
    assert code == 0
    assert _ok_paths(out) == sorted(GOOD)
    statuses = [b.status for b in server.batches()]
    assert statuses[:2] == ["expired", "failed"] and statuses.count("failed") == 1
    assert "wait until a live batch ends" in err


# --- issue 10: batch mode never pays twice, ingest takes only what was prepared, human-speed polls ---------


def test_identical_files_are_sent_once_in_batch_mode_too(server, tmp_path, cli):
    folder = copy_samples(tmp_path / "in", {**{f"copy_{i}.jpg": "coffee_cup.jpg" for i in range(4)},
                                             "cat.jpg": "chelsea_the_cat.jpg"})
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, "--batch-max-requests", "2")).code == 0
    assert sum(b.lines for b in server.batches()) == 2  # one coffee cup and one cat, in one chunk
    rows = {r["image_path"]: r for r in read_rows(out)}
    assert len(rows) == 5 and {r["status"] for r in rows.values()} == {"ok"}
    copies = [r for r in rows.values() if r["dedup_of"]]
    assert len(copies) == 3 and {r["dedup_of"] for r in copies} == {"copy_0.jpg"}
    assert all(r["caption"] == rows["copy_0.jpg"]["caption"] and r["total_tokens"] == 0 for r in copies)


def test_a_copy_of_an_image_captioned_online_is_not_sent_in_batch(server, tmp_path, cli):
    out = tmp_path / "out"
    online = copy_samples(tmp_path / "first", {"cup.jpg": "coffee_cup.jpg"})
    assert cli("run", online, "--job", DEMO_JOB, "--out", out, "--base-url", server.base_url, "--max-side", "256",
               "--no-progress").code == 0
    later = copy_samples(tmp_path / "later", {"cup.jpg": "coffee_cup.jpg", "mug.jpg": "coffee_cup.jpg",
                                              "cat.jpg": "chelsea_the_cat.jpg"})
    assert cli(*_argv(later, out, server)).code == 0
    assert [b.lines for b in server.batches()] == [1]  # only the cat: the cup's bytes were captioned online
    mug = latest_rows(out)["mug.jpg"]
    assert mug["dedup_of"] == "cup.jpg" and mug["status"] == "ok"


def test_detach_then_collect_counts_each_image_once(server, folder, tmp_path, cli):
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, "--detach")).code == 0
    deadline = time.monotonic() + 10
    while server.batches()[0].status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    code, printed, _ = cli("batch", "collect", str(out))
    assert code == 0 and f"{len(GOOD)} ok, 0 error, 0 already done" in printed
    assert f"0 ok, 0 error, {len(GOOD)} already done" in cli(*_argv(folder, out, server)).out


def test_cancel_reports_only_batches_it_cancelled(server, folder, tmp_path, cli):
    out = tmp_path / "out"
    assert cli(*_argv(folder, out, server, "--detach")).code == 0
    deadline = time.monotonic() + 10
    while server.batches()[0].status != "completed":  # it ended before anyone asked to cancel it
        assert time.monotonic() < deadline
        time.sleep(0.02)
    code, printed, _ = cli("batch", "cancel", out)
    assert code == 0 and "asked to cancel 0 batches" in printed
    assert cli("batch", "collect", str(out)).code == 0 and _ok_paths(out) == sorted(GOOD)


@pytest.mark.parametrize(("poll_s", "expected"), [(60, [1, 2, 4, 8, 16, 32, 60, 60]), (5, [1, 2, 4, 5, 5]),
                                                  (0.02, [0.02, 0.02])], ids=["default", "short", "tiny"])
def test_polls_start_at_a_second_and_double_up_to_poll_s(poll_s, expected):
    waits = poll_waits(poll_s)
    assert [next(waits) for _ in expected] == expected


def test_a_quick_batch_is_collected_long_before_poll_s(server, tmp_path, write_job):
    # poll_s = 1 h: without the quick first polls, this run would wait an hour for a batch that ends in 0.5 s
    server.set_batch_delay(0.5)
    folder = copy_samples(tmp_path / "in", GOOD[:2])
    argv = [sys.executable, "-m", "pipeline", *_argv(folder, tmp_path / "out", server)]
    argv[argv.index("--batch-poll-s") + 1] = "3600"
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(read_rows(tmp_path / "out")) == 2


def _output_line(custom_id, caption: str | None = "A cup.", status: int = 200, request_id: str = "req_1") -> str:
    body = ({"id": "c", "object": "chat.completion", "model": "local-caption",
             "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
             "choices": [{"index": 0, "message": {"role": "assistant", "content": caption}, "finish_reason": "stop"}]}
            if status == 200 else {"error": {"message": "upstream overloaded", "type": "server_error"}})
    return json.dumps({"id": f"batch_{request_id}", "custom_id": custom_id,
                       "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None})


def test_ingest_takes_only_prepared_requests_counts_garbage_and_adds_nothing_twice(server, tmp_path, cli):
    folder = copy_samples(tmp_path / "in", ["coffee_cup.jpg", "chelsea_the_cat.jpg"])
    dest, out = tmp_path / "requests", tmp_path / "out"
    assert cli("batch", "prepare", folder, "--job", DEMO_JOB, "--dest", dest).code == 0
    output = tmp_path / "output.jsonl"
    output.write_text("\n".join([_output_line("coffee_cup.jpg"), _output_line("../../etc/passwd", request_id="r2"),
                                 "{not json", _output_line("chelsea_the_cat.jpg", status=500, request_id="r3")])
                      + "\n")
    first = cli("batch", "ingest", out, output, "--job", DEMO_JOB, "--prepared", dest)
    assert first.code == 1  # the cat's line is an error row
    assert "1 refused" in first.out + first.err and "1 unreadable" in first.out + first.err
    rows = read_rows(out)
    assert sorted((r["image_path"], r["status"]) for r in rows) == [("chelsea_the_cat.jpg", "error"),
                                                                     ("coffee_cup.jpg", "ok")]
    cli("batch", "ingest", out, output, "--job", DEMO_JOB, "--prepared", dest)
    assert len(read_rows(out)) == 2  # the same file again: no row twice, error rows included


def test_ingest_without_prepared_refuses_a_custom_id_that_is_no_relative_path(tmp_path, cli):
    output = tmp_path / "output.jsonl"
    output.write_text(_output_line("../../etc/passwd") + "\n" + _output_line("/abs.jpg", request_id="r2") + "\n"
                      + _output_line("ok.jpg", request_id="r3") + "\n")
    ran = cli("batch", "ingest", tmp_path / "out", output, "--job", DEMO_JOB)
    assert ran.code == 0 and "2 refused" in ran.out + ran.err
    assert [r["image_path"] for r in read_rows(tmp_path / "out")] == ["ok.jpg"]


def test_an_over_long_result_line_is_skipped_not_read_whole():
    handle = io.BytesIO(b"first\n" + b"x" * 5000 + b"\nlast\n")
    assert list(result_lines(handle, "f.jsonl", limit=1000)) == [b"first\n", b"last\n"]
