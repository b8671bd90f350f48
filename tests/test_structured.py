"""Structured captions and alt-text guards, over loopback against the bundled endpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import DEMO_JOB, JOBS, read_rows

TAGS_JOB = JOBS / "tags_json.toml"


@pytest.fixture
def folder(sample_folder) -> Path:
    return sample_folder(["coffee_cup.jpg", "chelsea_the_cat.jpg", "rocket_launch_falcon9.jpg"])


@pytest.fixture
def run(server, cli):
    """`caption run` with the tags job (or `job=`) against the test server; (exit code, stderr)."""

    def run(folder: Path, out: Path, *flags: str, job: Path = TAGS_JOB) -> tuple[int, str]:
        code, _, err = cli("run", folder, "--job", job, "--out", out, "--base-url", server.base_url,
                           "--api-key-env", "", "--model", "local-caption", "--no-progress", "--concurrency", "1",
                           "--retry-base-s", "0.01", *flags)
        return code, err

    return run


def test_json_schema_answers_are_checked_and_stored_as_fields(server, folder, tmp_path, run):
    code, err = run(folder, tmp_path / "out")
    assert code == 0, err
    seen = server.observed()
    assert all("response_format" in o.body_keys for o in seen)
    for row in read_rows(tmp_path / "out"):
        fields = json.loads(row["fields"])
        assert set(fields) == {"alt_text", "long_caption", "tags", "contains_text"}
        assert isinstance(fields["tags"], list) and isinstance(fields["contains_text"], bool)
        assert json.loads(row["caption"]) == fields  # the raw answer is kept as it came


def test_a_malformed_answer_is_asked_for_once_more(server, folder, tmp_path, run):
    server.fail_next("bad_json")
    code, _ = run(folder, tmp_path / "out")
    assert code == 0
    attempts = sorted(r["attempts"] for r in read_rows(tmp_path / "out"))
    assert attempts == [1, 1, 2] and len(server.observed()) == 4


def test_two_malformed_answers_make_a_bad_output_row(server, folder, tmp_path, run):
    server.fail_next("bad_json", times=2)
    code, _ = run(folder, tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    (bad,) = [r for r in rows if r["status"] == "error"]
    assert code == 1 and (bad["error_kind"], bad["attempts"]) == ("bad_output", 2)
    assert "not JSON" in bad["error"] and bad["fields"] is None


def test_json_object_mode_checks_the_schema_it_cannot_send(server, folder, tmp_path, run):
    # The server's json_object answer has caption/colours/bright, not the schema's alt_text...
    code, _ = run(folder, tmp_path / "out", "--structured-format", "json_object", "--max-attempts", "2")
    rows = read_rows(tmp_path / "out")
    assert code == 1 and all(r["error_kind"] == "bad_output" for r in rows)
    assert rows[0]["error"].startswith("answer does not match the schema at top level")
    assert all(o.body_keys and "response_format" in o.body_keys for o in server.observed())


def test_a_schema_that_is_not_json_schema_stops_before_sending(server, folder, tmp_path, run):
    job = tmp_path / "bad.toml"
    job.write_text('[structured]\nformat = "json_schema"\n[structured.schema]\ntype = "objekt"\n')
    code, err = run(folder, tmp_path / "out", job=job)
    assert code == 2 and "[structured.schema] is not a valid JSON Schema" in err and err.count("\n") == 1
    assert server.observed() == []


def test_long_and_cut_captions_are_flagged_not_cut(server, folder, tmp_path, run):
    job = DEMO_JOB
    code, _ = run(folder, tmp_path / "long", "--max-chars", "20", job=job)
    rows = read_rows(tmp_path / "long")
    assert code == 0 and all(r["flags"] == ["over_max_chars"] and len(r["caption"]) > 20 for r in rows)
    code, _ = run(folder, tmp_path / "cut", "--max-tokens", "5", job=job)
    rows = read_rows(tmp_path / "cut")
    assert code == 0 and all(r["finish_reason"] == "length" and r["flags"] == ["length"] for r in rows)
    code, _ = run(folder, tmp_path / "fine", job=job)
    assert all(r["flags"] is None for r in read_rows(tmp_path / "fine"))


def test_flat_fields_become_their_own_export_columns(server, folder, tmp_path, run, cli):
    assert run(folder, tmp_path / "out")[0] == 0
    assert cli("export", tmp_path / "out", "--to", "csv", "--dest", tmp_path / "csv").code == 0
    (path,) = (tmp_path / "csv").glob("*.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 3
    for record in records:
        assert record["alt_text"] and record["contains_text"] in ("true", "false")
        assert "; " in record["tags"] or record["tags"]
    assert cli("export", tmp_path / "out", "--to", "jsonl", "--dest", tmp_path / "jsonl").code == 0
    (path,) = (tmp_path / "jsonl").glob("*.jsonl")
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(isinstance(line["tags"], list) and isinstance(line["contains_text"], bool) for line in lines)


def test_json_cut_by_max_tokens_is_not_asked_again_and_keeps_its_tokens(server, folder, tmp_path, run):
    code, _ = run(folder, tmp_path / "out", "--max-tokens", "8")
    rows = read_rows(tmp_path / "out")
    assert code == 1 and len(server.observed()) == 3  # one request per image: the same cut would come again
    for row in rows:
        assert (row["error_kind"], row["attempts"], row["finish_reason"]) == ("bad_output", 1, "length")
        assert "cut by max_tokens" in row["error"] and row["prompt_tokens"] > 0  # billed, so recorded


def test_a_schema_that_cannot_be_applied_stops_the_run(server, folder, tmp_path, run):
    job = tmp_path / "ref.toml"
    job.write_text('[prompt]\nuser = "Describe it as JSON."\n[structured]\nformat = "json_object"\n'
                   '[structured.schema]\n"$ref" = "#/definitions/nothere"\n')
    code, err = run(folder, tmp_path / "out", job=job)
    assert code == 3 and "cannot be applied" in err
    assert len(server.observed()) == 1  # stopped at the first answer instead of paying for every image
