#!/usr/bin/env python3
"""The real evaluation text: Jane Austen's novels from Debian's r-cran-janeaustenr.

The package ships the six novels as R lazy-load data, read here without R:

* ``data/Rdata.rdx`` is a gzip file holding one R object in XDR serialization
  ("X\\n", version 3): a named list ``variables`` (novel name -> int[2]
  ``(offset, length)`` into Rdata.rdb), ``references`` (empty) and
  ``compressed`` (TRUE = zlib; 2 = bzip2, 3 = xz in R's lazy-load format).
* ``data/Rdata.rdb`` holds the records back to back. A record is a 4-byte
  big-endian uncompressed length, then (for zlib) the zlib stream; for
  bzip2/xz a one-byte type tag sits between the length and the stream.
  The uncompressed record is again an XDR-serialized R object: a character
  vector with one element per line of the book.

``load_novel`` collapses whitespace and caches the result as ``data/<name>.txt``.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

DEB_PACKAGE = "r-cran-janeaustenr"
DATA_SUBDIR = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)


class JaneAustenError(RuntimeError):
    """Raised when the package cannot be fetched or read."""


def _parse_r_object(raw: bytes):
    """Parse one XDR-serialized R object into Python values with `rdata`."""
    import rdata  # lazy: only this tool needs it

    with warnings.catch_warnings():
        # rdata warns "Unknown file type: assumed RDS" for bare serializations.
        warnings.simplefilter("ignore", UserWarning)
        parsed = rdata.parser.parse_data(raw)
        return rdata.conversion.convert(parsed)


def read_index(rdx: bytes) -> tuple[dict[str, tuple[int, int]], int]:
    """Decode Rdata.rdx: returns ({name: (offset, length)}, compression code)."""
    index = _parse_r_object(gzip.decompress(rdx))
    variables = {str(k): (int(v[0]), int(v[1])) for k, v in index["variables"].items()}
    compressed = index.get("compressed", [True])
    code = int(compressed[0]) if len(compressed) else 1  # TRUE -> 1 (zlib)
    return variables, code


def read_record(rdb: bytes, offset: int, length: int, compression: int = 1):
    """Decode one Rdata.rdb record (the R object stored for one variable)."""
    record = rdb[offset : offset + length]
    if len(record) != length or length < 5:
        raise JaneAustenError(f"record at {offset} (+{length}) lies outside Rdata.rdb")
    expected = int.from_bytes(record[:4], "big")
    if compression == 1:
        raw = zlib.decompress(record[4:])
    else:
        tag, body = record[4:5], record[5:]
        if tag == b"2":
            raw = bz2.decompress(body)
        elif tag == b"Z":
            raw = lzma.decompress(body)
        elif tag == b"0":
            raw = body
        else:
            raise JaneAustenError(f"unknown record compression tag {tag!r}")
    if len(raw) != expected:
        raise JaneAustenError(f"record at {offset}: {len(raw)} bytes, header says {expected}")
    return _parse_r_object(raw)


def _extract_deb(workdir: Path) -> Path:
    """apt-get download + dpkg-deb -x into workdir; returns the data directory."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise JaneAustenError(f"{tool} not found: this needs a Debian-based system")

    def download() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["apt-get", "download", DEB_PACKAGE],
            cwd=workdir, capture_output=True, text=True,
        )

    res = download()
    if res.returncode != 0:
        # A fresh machine may have no package lists yet; `apt-get update` needs root.
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        res = download()
    debs = sorted(workdir.glob(f"{DEB_PACKAGE}_*.deb"))
    if res.returncode != 0 or not debs:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise JaneAustenError(f"apt-get download {DEB_PACKAGE} failed: {msg[-1] if msg else '?'}")
    root = workdir / "x"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    data = root / DATA_SUBDIR
    if not (data / "Rdata.rdx").is_file():
        raise JaneAustenError(f"{DATA_SUBDIR}/Rdata.rdx missing from {debs[0].name}")
    return data


def collapse_whitespace(lines) -> str:
    """Join lines with spaces and collapse every whitespace run to one space."""
    text = " ".join(str(line) for line in lines if line is not None)  # None = R NA
    return re.sub(r"\s+", " ", text).strip()


def load_all_novels(workdir: Path | None = None) -> dict[str, str]:
    """Fetch the Debian package and return {novel: whitespace-collapsed text}."""
    with tempfile.TemporaryDirectory(prefix="janeausten-") as tmp:
        data = _extract_deb(Path(workdir or tmp))
        rdb = (data / "Rdata.rdb").read_bytes()
        variables, code = read_index((data / "Rdata.rdx").read_bytes())
        return {
            name: collapse_whitespace(read_record(rdb, off, ln, code))
            for name, (off, ln) in variables.items()
        }


def cache_path(name: str, cache_dir: str | os.PathLike = "data") -> Path:
    return Path(cache_dir) / f"{name}.txt"


def load_novel(name: str = "prideprejudice", cache_dir: str | os.PathLike = "data") -> str:
    """Return the novel as one whitespace-collapsed string, cached in cache_dir.

    The first call fetches the .deb and caches all six novels (they come in one
    package); later calls read ``<cache_dir>/<name>.txt``.
    """
    if name not in NOVELS:
        raise ValueError(f"unknown novel {name!r}; choose from {', '.join(NOVELS)}")
    path = cache_path(name, cache_dir)
    if path.is_file() and path.stat().st_size > 0:
        return path.read_text(encoding="utf-8")
    novels = load_all_novels()
    if name not in novels:
        raise JaneAustenError(f"{name} not in the package (found {', '.join(novels)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    for novel, text in novels.items():
        target = cache_path(novel, cache_dir)
        tmp = target.with_suffix(".txt.tmp")  # write-then-rename: no half files
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    return novels[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fetch Jane Austen's novels from Debian's r-cran-janeaustenr (no R needed), "
        "collapse whitespace, cache as <cache-dir>/<novel>.txt, and print the path and size."
    )
    parser.add_argument(
        "novel", nargs="?", default="prideprejudice", choices=NOVELS,
        help="which novel to load (default: prideprejudice)",
    )
    parser.add_argument(
        "--cache-dir", default="data",
        help="directory for the cached .txt files (default: data)",
    )
    args = parser.parse_args(argv)
    try:
        text = load_novel(args.novel, args.cache_dir)
    except (JaneAustenError, OSError, subprocess.CalledProcessError, zlib.error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{cache_path(args.novel, args.cache_dir)}\t{len(text)} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
