"""Hostile input folders: FIFOs, devices, sockets, links out of INPUT, huge files, names that are not UTF-8.

Every case uses real files (mkfifo, a bound socket, os.symlink, a sparse file from truncate, Latin-1
names through bytes paths) and real runs against the bundled endpoint. Cases that hung before the
fix (a FIFO blocks `open`) run the CLI in a subprocess with a timeout, so a regression fails the
test instead of hanging the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, features

from conftest import ROOT, SAMPLES, copy_samples, latest_rows, read_rows
from pipeline.engine.caption import Captioner
from pipeline.errors import BadImageError
from pipeline.job import InputSettings, load_job
from pipeline.providers import make_provider
from pipeline.sources.folder import FileItem, FolderSource, escape_key, key_path, unescape_key, walk_images

PHOTO = SAMPLES / "coffee_cup.jpg"


def _keys(root: Path, **settings) -> tuple[list[str], dict[str, int]]:
    skipped: dict[str, int] = {}
    return [item.key for item in walk_images(root, InputSettings(**settings), skipped)], skipped


def _caption_cli(*argv: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """`caption *argv` in a child process that must end within `timeout_s` (a hang fails the test)."""
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s)


# --- 1. only regular files are read -----------------------------------------------------------


@pytest.fixture
def special_files(tmp_path: Path) -> Path:
    """in/: one photo, a FIFO, a UNIX socket and a link to a character device, all named like images."""
    folder = copy_samples(tmp_path / "in", ["coffee_cup.jpg"])
    os.mkfifo(folder / "x.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "s.png"))
    server.close()  # the socket file stays
    (folder / "null.jpg").symlink_to("/dev/null")
    return folder


def test_fifos_sockets_and_devices_are_passed_over_and_counted(special_files):
    keys, skipped = _keys(special_files, follow_links=True)  # even through a followed link
    assert keys == ["coffee_cup.jpg"]
    assert skipped == {"not a regular file": 3}


@pytest.mark.timeout(20)
def test_a_file_swapped_for_a_fifo_after_the_walk_is_refused_at_read_time(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(PHOTO.read_bytes())
    (item,) = walk_images(tmp_path)
    path.unlink()
    os.mkfifo(path)  # a plain open() of it would block until a writer came
    with pytest.raises(OSError, match="not a regular file \\(a FIFO\\)"):
        item.read()
    with pytest.raises(OSError, match="a FIFO"):
        item.open()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("command", ["run", "estimate", "batch-prepare"])
def test_a_fifo_named_like_an_image_never_blocks_a_command(special_files, tmp_path, command):
    job = ["--job", str(ROOT / "jobs" / "demo.toml")]
    argv = {"run": ["run", str(special_files), *job, "--out", str(tmp_path / "out"), "--no-progress"],
            "estimate": ["estimate", str(special_files), *job],
            "batch-prepare": ["batch", "prepare", str(special_files), *job, "--dest", str(tmp_path / "req")]}[command]
    done = _caption_cli(*argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "x.jpg: not a regular file (a FIFO); not read" in done.stderr
    if command == "run":
        assert [r["image_path"] for r in read_rows(tmp_path / "out")] == ["coffee_cup.jpg"]


# --- 2. nothing is read without a size limit -------------------------------------------------


def test_a_file_over_the_size_limit_is_an_error_row_and_never_read(server, tmp_path, caption_run):
    folder = copy_samples(tmp_path / "in", ["coffee_cup.jpg"])
    with open(folder / "huge.jpg", "wb") as sparse:
        sparse.truncate(1_500_000_000)  # 1.5 GB on the books, no blocks on disk
    assert caption_run(server, folder, tmp_path / "out") == 1
    rows = latest_rows(tmp_path / "out")
    assert rows["coffee_cup.jpg"]["status"] == "ok"
    huge = rows["huge.jpg"]
    assert huge["error_kind"] == "bad_image" and "1,500 MB, over the 256 MB limit" in huge["error"]
    assert caption_run(server, folder, tmp_path / "out2", "--max-file-mb", "0.01") == 1
    assert "over the 0.01 MB limit" in latest_rows(tmp_path / "out2")["coffee_cup.jpg"]["error"]


def test_the_read_itself_is_bounded_for_files_whose_size_says_nothing(tmp_path):
    # /proc files are regular files of size 0 whatever they hold: only a bounded read stops them
    item = FileItem(Path("/proc/self/status"), "status.jpg", max_bytes=10)
    with pytest.raises(OSError, match="more than 0 MB, over the 0 MB limit"):
        item.read()
    assert len(FileItem(Path("/proc/self/status"), "status.jpg", max_bytes=1_000_000).read()) > 10


def test_a_file_that_is_not_an_image_is_refused_from_its_header_unread():
    class HeaderOnly:
        key = "notes.jpg"

        def open(self):
            return open(ROOT / "README.md", "rb")

        def read(self):
            raise AssertionError("read whole although its header says it is no image")

    captioner = Captioner(load_job(None), make_provider(load_job(None), "http://127.0.0.1:9/v1", api_key=None,
                                                        headers={}))
    with pytest.raises(BadImageError, match="not an image Pillow can read"):
        captioner.prepare(HeaderOnly())


def test_estimate_counts_oversize_devices_and_fifos_as_unreadable_or_passed_over(special_files, tmp_path, cli):
    (special_files / "zero.jpg").symlink_to("/dev/zero")
    code, out, _ = cli("estimate", special_files, "--job", ROOT / "jobs" / "demo.toml", "--follow-links",
                       "--max-file-mb", "0.001")
    assert code == 0 and "0 images under" in out and "(1 unreadable)" in out


# --- 7. links that leave INPUT are not followed silently -------------------------------------


@pytest.fixture
def linked(tmp_path: Path) -> Path:
    """in/ with a photo, a link to a photo outside, a link to a folder outside, and a link inside."""
    outside = copy_samples(tmp_path / "outside", {"far.jpg": "coffee_cup.jpg", "dir/deep.jpg": "chelsea_the_cat.jpg"})
    folder = copy_samples(tmp_path / "in", {"a.jpg": "coffee_cup.jpg", "sub/b.png": "horse_silhouette_1bit.png"})
    (folder / "far.jpg").symlink_to(outside / "far.jpg")
    (folder / "passwd.jpg").symlink_to("/etc/passwd")
    (folder / "dir").symlink_to(outside / "dir")
    (folder / "near.jpg").symlink_to(folder / "sub" / "b.png")
    return folder


def test_links_out_of_input_are_skipped_with_one_line_each_unless_followed(linked, caplog):
    with caplog.at_level("INFO", logger="pipeline.sources.folder"):
        keys, skipped = _keys(linked)
    assert keys == ["a.jpg", "near.jpg", "sub/b.png"]
    assert skipped == {"link outside INPUT": 3}
    lines = [r.getMessage() for r in caplog.records if "outside INPUT" in r.getMessage()]
    assert len(lines) == 3 and any("passwd.jpg: a link to /etc/passwd" in line for line in lines)
    followed, _ = _keys(linked, follow_links=True)
    assert followed == ["a.jpg", "dir/deep.jpg", "far.jpg", "near.jpg", "passwd.jpg", "sub/b.png"]


def test_a_run_sends_nothing_from_outside_input_by_default(server, linked, tmp_path, cli, job_file):
    run = ["run", linked, "--job", job_file(), "--base-url", server.base_url, "--no-progress"]
    code, _, err = cli(*run, "--out", tmp_path / "out")
    assert code == 0 and sorted(latest_rows(tmp_path / "out")) == ["a.jpg", "near.jpg", "sub/b.png"]
    assert err.count("outside INPUT (--follow-links follows it)") == 3
    assert len(server.observed()) == 2  # near.jpg is a link to sub/b.png: the same bytes, sent once
    code, _, _ = cli(*run, "--out", tmp_path / "out2", "--follow-links")
    rows = latest_rows(tmp_path / "out2")
    assert code == 1 and sorted(rows) == ["a.jpg", "dir/deep.jpg", "far.jpg", "near.jpg", "passwd.jpg", "sub/b.png"]
    assert rows["passwd.jpg"]["error_kind"] == "bad_image"  # followed on request: read, refused as no image


def test_follow_links_is_a_job_field_outside_the_fingerprint():
    base = load_job(ROOT / "jobs" / "demo.toml")
    followed = load_job(ROOT / "jobs" / "demo.toml", {"input.follow_links": True, "input.max_file_mb": 10})
    assert followed.input == InputSettings(follow_links=True, max_file_mb=10.0)
    assert followed.fingerprint == base.fingerprint


# --- 9. every file name round-trips ----------------------------------------------------------


LATIN1 = os.fsdecode(b"caf\xe9.jpg")


@pytest.mark.parametrize("name, key", [
    ("photo.jpg", "photo.jpg"),
    ("dir/caf\u00e9.jpg", "dir/caf\u00e9.jpg"),
    (LATIN1, "caf\\xe9.jpg"),  # as before: existing out folders keep their keys
    ("caf\\xe9.jpg", "caf\\\\xe9.jpg"),  # a real backslash: a key of its own
    ("a\\b\\\\c.jpg", "a\\\\b\\\\\\\\c.jpg"),
    (os.fsdecode(b"\xff\\\xfe.png"), "\\xff\\\\\\xfe.png"),
], ids=["plain", "utf8", "latin1", "backslash", "backslashes", "mixed"])
def test_keys_escape_reversibly(name, key):
    assert escape_key(name) == key and unescape_key(key) == name


@pytest.mark.parametrize("key", ["a\\", "a\\q.jpg", "\\x41.jpg", "\\xc3\\xa9.jpg", "\\XE9.jpg", "a\x00b.jpg",
                                 "..\\x2f..\\x2fetc", "../x.jpg", "/etc/passwd", ".", "a//b.jpg", ""],
                         ids=["trailing", "unknown-escape", "ascii-escape", "utf8-escaped", "upper-hex", "nul",
                              "escaped-slash", "climb", "absolute", "dot", "empty-part", "empty"])
def test_keys_no_walk_makes_name_no_path(key):
    assert key_path(Path("/root"), key) is None


def test_a_latin1_name_and_its_escaped_twin_are_both_captioned_and_resume(server, tmp_path, caption_run):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / LATIN1).write_bytes(PHOTO.read_bytes())
    (folder / "caf\\xe9.jpg").write_bytes(PHOTO.read_bytes() + b"twin")
    assert caption_run(server, folder, tmp_path / "out") == 0
    assert sorted(latest_rows(tmp_path / "out")) == ["caf\\\\xe9.jpg", "caf\\xe9.jpg"]
    assert caption_run(server, folder, tmp_path / "out") == 0  # the rerun finds both done
    assert len(read_rows(tmp_path / "out")) == 2 and len(server.observed()) == 2
    source = FolderSource(folder)
    assert source.open_by_key("caf\\xe9.jpg").read() == PHOTO.read_bytes()
    assert source.open_by_key("caf\\\\xe9.jpg").read().endswith(b"twin")


# --- 15. nothing is skipped silently ---------------------------------------------------------


FORMATS = {".jp2": "JPEG2000", ".ico": "ICO", ".ppm": "PPM", ".tga": "TGA", ".jfif": "JPEG", ".apng": "PNG"}
if features.check("avif"):
    FORMATS[".avif"] = "AVIF"


def test_every_format_the_image_stage_reads_is_walked_and_captioned(server, tmp_path, caption_run):
    folder = tmp_path / "in"
    folder.mkdir()
    with Image.open(PHOTO) as photo:
        small = photo.convert("RGB").resize((64, 48))
    for ext, name in FORMATS.items():
        small.save(folder / f"photo{ext}", name)
    (folder / "notes.txt").write_text("not an image")
    assert caption_run(server, folder, tmp_path / "out") == 0
    rows = latest_rows(tmp_path / "out")
    assert sorted(rows) == sorted(f"photo{ext}" for ext in FORMATS)
    assert all(row["status"] == "ok" for row in rows.values())


def test_the_summary_says_what_was_passed_over(server, special_files, tmp_path, cli):
    (special_files / "x.jpg").unlink()  # in-process: no FIFO, so a regression cannot wedge the suite
    (special_files / "notes.txt").write_text("x")
    (special_files / ".DS_Store").write_text("x")
    code, out, _ = cli("run", special_files, "--job", ROOT / "jobs" / "demo.toml", "--out", tmp_path / "out",
                       "--no-progress")
    assert code == 0
    assert "caption: passed over: 1 hidden, 1 link outside INPUT, 1 not a regular file, 1 not an image file" in out


@pytest.mark.parametrize("make, message", [
    (lambda root: root.mkdir(), "holds no files: nothing to caption"),
    (lambda root: copy_samples(root, {"notes.txt": "coffee_cup.jpg", ".hidden.jpg": "coffee_cup.jpg"}),
     "holds no image file to caption; passed over: 1 hidden, 1 not an image file"),
    (lambda root: (root.parent.mkdir(exist_ok=True), root.write_text("x")), "is not an image file"),
    (lambda root: os.mkfifo(root), "is not a regular file or a folder (a FIFO)"),
], ids=["empty-folder", "no-images", "one-non-image", "a-fifo"])
def test_an_input_without_images_is_exit_2_before_anything_is_made(tmp_path, cli, make, message):
    root = tmp_path / "input"
    make(root)
    code, _, err = cli("run", root, "--job", ROOT / "jobs" / "demo.toml", "--out", tmp_path / "out", "--no-progress")
    assert code == 2 and f"{root}: {message}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
