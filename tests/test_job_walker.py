"""Job files (every shipped one loads; bad ones fail with a line naming the field) and the walker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import JOBS
from pipeline.errors import JobError
from pipeline.job import load_job, resolve_api_key, resolve_headers
from pipeline.sources.folder import walk_images


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_job_files_load(path):
    job = load_job(path)
    assert job.endpoint.model and len(job.fingerprint) == 16


def test_relay_job_streams_and_takes_its_key_from_relay_api_key():
    job = load_job(JOBS / "relay.toml")
    assert job.endpoint.stream and job.endpoint.api_key_env == "RELAY_API_KEY"
    assert job.endpoint.base_url.startswith("https://")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[image]\nmax_sid = 512\n", r"\[image\] unknown key 'max_sid' \(did you mean 'max_side'\?\)"),
        ("[imagee]\n", r"unknown section \[imagee\] \(did you mean 'image'\?\)"),
        ("[image]\nmax_side = '512'\n", r"\[image\] max_side must be a whole number"),
        ("[image]\ndetail = 'ultra'\n", r"\[image\] detail must be one of 'low', 'high', 'auto'"),
        ("[endpoint]\nstream = 'yes'\n", r"\[endpoint\] stream must be true or false"),
        ("[limits]\nconcurrency = 0\n", r"\[limits\] concurrency = 0 is out of range"),
        ("[endpoint]\nbase_url = 'api.openai.com'\n", r"\[endpoint\] base_url must be http"),
        ("[request.extra]\nmodel = 'x'\n", r"\[request.extra\] model is set by caption itself"),
        ("[endpoint\n", r"not valid TOML"),
        ("[structured]\nformat = 'json_schema'\nname = 'my caption!'\n[structured.schema]\ntype = 'object'\n",
         r"\[structured\] name must be 1-64 letters"),
        ("[structured]\nformat = 'json_schema'\n[structured.schema]\ntype = 'object'\n"
         "properties = { a = { type = 'string' } }\n", r"additionalProperties = false, which strict mode requires"),
        ("[structured]\nformat = 'json_schema'\n[structured.schema]\ntype = 'object'\nadditionalProperties = false\n"
         "properties = { a = { type = 'string' } }\n", r"must list a in required"),
        ("[structured]\nformat = 'json_object'\n", r"needs the word JSON"),
        ("[batch]\nmax_requests = 100000\n", r"\[batch\] max_requests = 100000 is out of range"),
        ("[batch]\ncompletion_window = '12h'\n", r"\[batch\] completion_window must be one of '24h'"),
    ],
    ids=["unknown-key", "unknown-section", "wrong-type", "bad-choice", "bad-bool", "range", "url", "reserved-extra",
         "toml-syntax", "schema-name", "strict-additional", "strict-required", "json-object-word", "batch-size",
         "batch-window"],
)
def test_bad_job_files_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(JobError, match=message) as info:
        load_job(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_overrides_win_and_change_the_fingerprint_only_when_the_answer_would_change():
    base = load_job(JOBS / "demo.toml")
    assert load_job(JOBS / "demo.toml", {"limits.concurrency": 3}).fingerprint == base.fingerprint
    assert load_job(JOBS / "demo.toml", {"endpoint.base_url": "http://x/v1"}).fingerprint == base.fingerprint
    changed = load_job(JOBS / "demo.toml", {"image.max_side": 256})
    assert changed.image.max_side == 256 and changed.fingerprint != base.fingerprint


def test_missing_key_env_is_a_job_error_that_never_shows_a_key(tmp_path, monkeypatch):
    path = tmp_path / "j.toml"
    path.write_text("[endpoint]\nbase_url='https://x/v1'\napi_key_env='CAPTION_TEST_KEY'\n"
                    "[endpoint.headers]\nX-Org = '${CAPTION_TEST_ORG}'\n")
    monkeypatch.delenv("CAPTION_TEST_KEY", raising=False)
    with pytest.raises(JobError, match="CAPTION_TEST_KEY, which is not set"):
        resolve_api_key(load_job(path))
    monkeypatch.setenv("CAPTION_TEST_KEY", "sk-secret-value")
    monkeypatch.setenv("CAPTION_TEST_ORG", "org-7")
    job = load_job(path)
    assert resolve_api_key(job) == "sk-secret-value"
    assert resolve_headers(job) == {"X-Org": "org-7"}


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_walker_order_extensions_hidden_and_symlink_loops(tmp_path):
    _touch(tmp_path, "b.JPG", "a/z.tiff", "a/y.WebP", "a/notes.txt", "a/.hidden.png", ".cache/x.jpg",
           "a/b/c.gif", "c.bmp", "d.jpeg", "e.tif", "f.png")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    keys = [s.key for s in walk_images(tmp_path)]
    assert keys == ["a/b/c.gif", "a/y.WebP", "a/z.tiff", "b.JPG", "c.bmp", "d.jpeg", "e.tif", "f.png"]
    assert keys == [s.key for s in walk_images(tmp_path)]


def test_walker_streams_without_listing_the_whole_tree(tmp_path):
    for i in range(50):
        _touch(tmp_path, f"d{i:02d}/img.jpg")
    walk = walk_images(tmp_path)
    first = next(walk)
    assert first.key == "d00/img.jpg"
    (tmp_path / "d49" / "late.jpg").write_bytes(b"x")  # added after the walk began: still found
    assert "d49/late.jpg" in [s.key for s in walk]


def test_every_field_has_its_own_flag_and_a_shared_name_takes_its_section():
    """`--format` is [image] format (as it was before [input] had one); `--input-format` is [input] format."""
    import argparse

    from pipeline.cli.common import add_overrides, job_overrides
    from pipeline.job import OVERRIDABLE

    assert OVERRIDABLE["format"] == "image.format" and OVERRIDABLE["input_format"] == "input.format"
    assert len(set(OVERRIDABLE.values())) == len(OVERRIDABLE)
    parser = argparse.ArgumentParser()
    add_overrides(parser)
    overrides = job_overrides(parser.parse_args(["--format", "webp", "--input-format", "table"]))
    assert overrides == {"image.format": "webp", "input.format": "table"}
