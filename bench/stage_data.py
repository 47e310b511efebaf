"""Ship the full CIFAR-100 to a lent GPU machine in parts small enough for one call each.

    python bench/stage_data.py split SRC_ROOT PARTS_DIR [--part-mb 50]   # here
    python bench/stage_data.py join PARTS_DIR DST_ROOT                   # there, after the last part arrived

`split` reads SRC_ROOT/cifar-100-python/{meta,test,train}, cuts their concatenation into parts
of at most --part-mb megabytes (10^6 bytes; the lent machine takes 64 MiB a call, and the
checkout travels too) and writes PARTS_DIR/part-NN plus PARTS_DIR/manifest.json: the sha256 and
size of every part and of every whole file. It reads the parts back before it finishes, so a
manifest exists only for parts that reproduce the source. `join` checks every part against the
manifest, rebuilds the files under DST_ROOT/cifar-100-python/, and checks each against the source's
sha256; a missing or corrupt part stops it with one line naming the part, before anything is
written. The device calls that carry the parts are in bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

FOLDER = "cifar-100-python"
FILES = ("meta", "test", "train")
CHUNK = 1 << 20


class StageError(Exception):
    """A problem the user must fix; printed as one line."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stream(paths: list[Path]):
    for path in paths:
        with path.open("rb") as f:
            while block := f.read(CHUNK):
                yield block


def split(src_root: Path, parts_dir: Path, part_bytes: int) -> dict:
    """Write the parts and the manifest; returns the manifest."""
    sources = [src_root / FOLDER / name for name in FILES]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise StageError(f"no CIFAR-100 file {missing[0]} (SRC_ROOT is the folder that holds {FOLDER}/)")
    parts_dir.mkdir(parents=True, exist_ok=True)
    for old in parts_dir.glob("part-*"):
        old.unlink()
    files = [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sources]
    parts, out, written = [], None, 0
    for block in _stream(sources):
        while block:
            if out is None:
                out, written = (parts_dir / f"part-{len(parts):02d}").open("wb"), 0
                parts.append(Path(out.name))
            take = block[: part_bytes - written]
            out.write(take)
            written += len(take)
            block = block[len(take) :]
            if written == part_bytes:
                out.close()
                out = None
    if out is not None:
        out.close()
    manifest = {
        "folder": FOLDER,
        "files": files,
        "parts": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in parts],
    }
    _rebuilt_hashes(parts_dir, manifest, check_only=True)  # the parts reproduce the source, or no manifest
    (parts_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _rebuilt_hashes(parts_dir: Path, manifest: dict, check_only: bool, dst: Path | None = None) -> None:
    """Cut the parts' concatenation into the manifest's files, check each sha256, and (unless
    `check_only`) write them under `dst`, each through a temporary name."""
    stream = _stream([parts_dir / p["name"] for p in manifest["parts"]])
    pending = b""
    for entry in manifest["files"]:
        digest, left = hashlib.sha256(), entry["bytes"]
        tmp = dst / f".{entry['name']}.tmp" if not check_only else None
        sink = tmp.open("wb") if tmp else None
        try:
            while left:
                if not pending:
                    pending = next(stream, b"")
                    if not pending:
                        raise StageError(f"the parts end before {entry['name']} is complete")
                take, pending = pending[:left], pending[left:]
                digest.update(take)
                if sink:
                    sink.write(take)
                left -= len(take)
        finally:
            if sink:
                sink.close()
        if digest.hexdigest() != entry["sha256"]:
            raise StageError(f"{entry['name']} rebuilt from the parts does not match the source's sha256")
        if tmp:
            os.replace(tmp, dst / entry["name"])


def join(parts_dir: Path, dst_root: Path) -> list[str]:
    """Check every part, rebuild the files under `dst_root`/cifar-100-python and check them;
    files already there with the right sha256 are kept. Returns the names written."""
    manifest_path = parts_dir / "manifest.json"
    if not manifest_path.is_file():
        raise StageError(f"no manifest at {manifest_path}: carry {parts_dir}/manifest.json with the first part")
    manifest = json.loads(manifest_path.read_text())
    dst = dst_root / manifest["folder"]
    if all((dst / f["name"]).is_file() and sha256_file(dst / f["name"]) == f["sha256"] for f in manifest["files"]):
        return []
    for part in manifest["parts"]:
        path = parts_dir / part["name"]
        if not path.is_file():
            raise StageError(f"part {part['name']} is missing from {parts_dir} (carry it in a call first)")
        if path.stat().st_size != part["bytes"] or sha256_file(path) != part["sha256"]:
            raise StageError(
                f"part {part['name']} is corrupt (size or sha256 differs from the manifest): carry it again"
            )
    dst.mkdir(parents=True, exist_ok=True)
    _rebuilt_hashes(parts_dir, manifest, check_only=False, dst=dst)
    return [f["name"] for f in manifest["files"]]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    s = sub.add_parser("split", help="cut SRC_ROOT's files into parts plus a manifest")
    s.add_argument("src_root", type=Path)
    s.add_argument("parts_dir", type=Path)
    s.add_argument("--part-mb", type=float, default=50.0, help="largest part in 10^6 bytes (default 50)")
    j = sub.add_parser("join", help="rebuild and verify the files from the parts")
    j.add_argument("parts_dir", type=Path)
    j.add_argument("dst_root", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.action == "split":
            if not 0 < args.part_mb < 60:
                raise StageError(f"--part-mb={args.part_mb}: must be above 0 and below 60")
            manifest = split(args.src_root, args.parts_dir, int(args.part_mb * 1e6))
            sizes = ", ".join(f"{p['name']} {p['bytes'] / 1e6:.1f} MB" for p in manifest["parts"])
            print(f"{len(manifest['parts'])} parts in {args.parts_dir}: {sizes}; every file checked against the source")
        else:
            written = join(args.parts_dir, args.dst_root)
            where = args.dst_root / FOLDER
            print(
                f"rebuilt and verified {', '.join(written)} in {where}"
                if written
                else f"{where} already holds every file, verified"
            )
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
