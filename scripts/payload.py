"""Carry NVIDIA DALI to a GPU machine that has no network and receives at most 64 MiB at a time.

The payload is DALI 2.4.0 and what it needs beyond a CUDA 13 torch image (the nvImageCodec,
nvJPEG, nvJPEG2000, nvTIFF and nvCOMP libraries, and DALI's small Python dependencies), as one
installed ``site-packages`` tree: pruned to one CPython version, packed as a tar, compressed with
xz, and cut into parts of at most ``--part-mib`` MiB. A ``manifest.json`` beside every part gives
the sha256 of each part and of the whole stream, so each transfer can be checked on arrival and
the last one can rebuild the tree from the parts alone.

    python3 scripts/payload.py stage-wheels WHEEL... --dest STAGE     # unpack downloaded wheels
    python3 scripts/payload.py stage-installed --dest STAGE           # copy installed dists
    python3 scripts/payload.py prune STAGE --python 3.12 [--strip]    # drop what is never loaded
    python3 scripts/payload.py pack STAGE OUT_DIR [--part-mib 60] [--preset 9]
    python3 scripts/payload.py check OUT_DIR/part-00 [--sha256 HEX]   # one part, on arrival
    python3 scripts/payload.py install OUT_DIR DEST                   # verify all, unpack to DEST
    python3 scripts/payload.py smoke [--gpu]                          # a DALI pipeline, imported
                                                                      # from wherever it is found

Standard library only (it runs on the bare image before anything is installed), Python >= 3.10.
Sizes are bytes unless a name says MiB.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

MANIFEST = "manifest.json"
MIB = 1024 * 1024
# DALI and what it loads beyond a torch 2.11 cu130 image, which brings numpy, packaging, pyyaml,
# typing-extensions and six, and the CUDA 13.0 runtime, cuBLAS, cuFFT, cuRAND, ... but no nvJPEG.
DISTRIBUTIONS = (
    "nvidia-dali-cuda130",
    "nvidia-nvimgcodec-cu13",
    "nvidia-nvjpeg",
    "nvidia-nvjpeg2k-cu13",
    "nvidia-nvtiff-cu13",
    "nvidia-libnvcomp-cu13",
    "astunparse",
    "gast",
    "libcst",
    "makefun",
    "optree",
    "nvtx",
)
# What DALI imports that the image already has (the test's stand-in for the image uses these).
IMAGE_PROVIDES = ("numpy", "packaging", "pyyaml", "typing-extensions", "six")
# ``nvidia`` is shared by many distributions. A regular package whose __path__ also takes in every
# other ``nvidia`` directory on sys.path: the payload's copy is found first wherever it is
# installed, and the image's nvidia/cu13 (torch's CUDA libraries) stays importable beside it.
NVIDIA_INIT = (
    '"""Namespace of NVIDIA distributions, merged across sys.path (pkgutil style)."""\n'
    "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
)
# A 24x16 baseline JPEG (quality 75) for the smoke pipeline: no image library needed to make one.
SMOKE_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHRofHh0aHBwgJC4nICIsIxwc"
    "KDcpLDAxNDQ0Hyc5PTgyPC4zNDL/2wBDAQkJCQwLDBgNDRgyIRwhMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIy"
    "MjIyMjIyMjIyMjIyMjIyMjIyMjL/wAARCAAQABgDASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcI"
    "CQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRol"
    "JicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ip"
    "qrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAA"
    "AAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLR"
    "ChYkNOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaX"
    "mJmaoqOkpaanqKmqsrO0tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEA"
    "PwDj7ObpzW9ZzdOa5Czm6c1v2c3Tmvr80r7nPDK/I6+zm6c0Vn2c3TmivgsTX/eM645Xpsf/2Q=="
)
SMOKE_SIZE = (16, 24)  # height, width of SMOKE_JPEG


class PayloadError(Exception):
    """A payload that cannot be built, checked or installed; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Staging: an installed site-packages tree of DISTRIBUTIONS


def stage_wheels(wheels: Iterable[Path], dest: Path) -> list[str]:
    """Unpack wheels into ``dest`` as pip would install them into site-packages (``*.data/purelib``
    and ``platlib`` merged into the root; scripts and headers dropped). Returns the wheel names."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for wheel in sorted(wheels):
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                parts = Path(info.filename).parts
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue  # scripts, headers, data: nothing DALI loads
                    parts = parts[2:]
                target = dest.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, MIB)
        names.append(wheel.name)
    return names


def installed_files(distribution: str) -> tuple[Path, list[Path]]:
    """(site-packages directory, files relative to it) of an installed distribution, per RECORD."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise PayloadError(
            f"{distribution} is not installed in {sys.prefix}; install it or use stage-wheels"
        ) from err
    root = Path(dist.locate_file(""))
    files = [Path(f) for f in dist.files or () if not str(f).startswith("..")]
    if not files:
        raise PayloadError(f"{distribution} has no RECORD in {root}; reinstall it with pip")
    return root, files


def stage_installed(distributions: Iterable[str], dest: Path) -> list[str]:
    """Copy the files of installed distributions (this interpreter's) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    staged = []
    for name in distributions:
        root, files = installed_files(name)
        for rel in files:
            src = root / rel
            if not src.is_file() or "__pycache__" in rel.parts:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
        staged.append(f"{name}=={importlib.metadata.version(name)}")
    return staged


# --------------------------------------------------------------------------------------------
# Pruning: what the project never loads

EXTENSION = re.compile(r"\.cpython-(\d+t?)-[^/]*\.so$")
SHARED = re.compile(r"\.so(\.|$)")  # libfoo.so, libfoo.so.1, libfoo.so.0unstable
PRUNED_DIRS = ("include", "__pycache__", "tests", "test")
PRUNED_SUFFIXES = (".a", ".h", ".hpp", ".cuh", ".pyc")


def python_tag(version: str) -> str:
    """``"3.12"`` -> ``"312"``, the tag of ``*.cpython-312-*.so`` extension modules."""
    major, _, minor = version.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise PayloadError(f"--python {version!r} must be MAJOR.MINOR, e.g. 3.12")
    return f"{major}{minor}"


def prune(root: Path, version: str) -> dict[str, int]:
    """Delete from ``root``: extension modules of other CPython versions, headers, static
    libraries, tests, byte code, command-line tools of the libraries; give ``nvidia/`` its
    merging ``__init__``. Returns ``{"files": n, "bytes": b}`` removed."""
    keep = python_tag(version)
    removed = {"files": 0, "bytes": 0}

    def drop(path: Path) -> None:
        if path.is_dir():
            for f in path.rglob("*"):
                if f.is_file():
                    removed["files"] += 1
                    removed["bytes"] += f.stat().st_size
            shutil.rmtree(path)
        elif path.exists():
            removed["files"] += 1
            removed["bytes"] += path.stat().st_size
            path.unlink()

    packages = [p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")]
    for package in packages:
        for directory in sorted(package.rglob("*"), reverse=True):  # deepest first
            if directory.is_dir() and directory.name in PRUNED_DIRS:
                drop(directory)
    for path in sorted(root.rglob("*")):
        if not path.is_file() or ".dist-info" in str(path.relative_to(root)):
            continue
        match = EXTENSION.search(path.name)
        if (match and match.group(1) != keep) or path.name.endswith(PRUNED_SUFFIXES):
            drop(path)
    drop(root / "nvidia" / "libnvcomp" / "bin")  # nvCOMP's command-line tools
    if (root / "nvidia").is_dir():
        (root / "nvidia" / "__init__.py").write_text(NVIDIA_INIT)
    return removed


def strip_libraries(root: Path, strip: str = "strip") -> dict[str, int]:
    """``strip --strip-unneeded`` on every shared library under ``root`` (symbol tables that the
    dynamic linker does not use; CUDA fat binaries are loaded sections and stay). Returns
    ``{"files": n, "saved": bytes}``; fails when ``strip`` is missing."""
    if shutil.which(strip) is None:
        raise PayloadError(f"{strip!r} not found; install binutils or run prune without --strip")
    libraries = [p for p in sorted(root.rglob("*")) if p.is_file() and SHARED.search(p.name)]
    before = sum(p.stat().st_size for p in libraries)
    for lib in libraries:
        subprocess.run([strip, "--strip-unneeded", str(lib)], check=True)
    return {"files": len(libraries), "saved": before - sum(p.stat().st_size for p in libraries)}


# --------------------------------------------------------------------------------------------
# Packing: tar -> xz -> parts of at most part_bytes


def part_dir(index: int) -> str:
    return f"part-{index:02d}"


def part_file(name: str, index: int) -> str:
    return f"{name}.tar.xz.{index:02d}"


class _PartWriter(io.RawIOBase):
    """A write-only stream that compresses with xz and cuts the output into numbered parts."""

    def __init__(self, out_dir: Path, name: str, part_bytes: int, preset: int) -> None:
        self.out_dir, self.name, self.part_bytes = out_dir, name, part_bytes
        self.compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=preset)
        self.parts: list[dict] = []
        self.whole = hashlib.sha256()
        self.raw_bytes = 0
        self._file = None
        self._hash = None
        self._size = 0

    def writable(self) -> bool:
        return True

    def _emit(self, data: bytes) -> None:
        self.whole.update(data)
        while data:
            if self._file is None or self._size == self.part_bytes:
                self._open_next()
            take = data[: self.part_bytes - self._size]
            self._file.write(take)
            self._hash.update(take)
            self._size += len(take)
            data = data[len(take) :]

    def _open_next(self) -> None:
        self._close_part()
        index = len(self.parts)
        directory = self.out_dir / part_dir(index)
        directory.mkdir(parents=True, exist_ok=True)
        rel = f"{part_dir(index)}/{part_file(self.name, index)}"
        self.parts.append({"file": rel})
        self._file = open(self.out_dir / rel, "wb")  # noqa: SIM115  (held across writes)
        self._hash, self._size = hashlib.sha256(), 0

    def _close_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self.parts[-1].update(bytes=self._size, sha256=self._hash.hexdigest())
            self._file = None

    def write(self, data) -> int:
        self.raw_bytes += len(data)
        self._emit(self.compressor.compress(bytes(data)))
        return len(data)

    def finish(self) -> None:
        self._emit(self.compressor.flush())
        self._close_part()


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Reproducible members: no owner, no time, plain permissions."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
    return info


def pack(stage: Path, out_dir: Path, name: str, part_mib: float, preset: int = 9) -> dict:
    """Pack ``stage`` (its contents, sorted) into ``out_dir/part-NN/NAME.tar.xz.NN`` of at most
    ``part_mib`` MiB each, and write the manifest beside every part and in ``out_dir``."""
    part_bytes = int(part_mib * MIB)
    if part_bytes < 1:
        raise PayloadError(f"--part-mib {part_mib} must be > 0")
    if not stage.is_dir() or not any(stage.iterdir()):
        raise PayloadError(f"{stage} is empty; stage the distributions first")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    writer = _PartWriter(out_dir, name, part_bytes, preset)
    files = 0
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(stage.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=str(path.relative_to(stage)), filter=_tar_filter)
                files += 1
    writer.finish()
    manifest = {
        "name": name,
        "format": "tar.xz",
        "files": files,
        "tar_bytes": writer.raw_bytes,
        "bytes": sum(p["bytes"] for p in writer.parts),
        "sha256": writer.whole.hexdigest(),
        "parts": writer.parts,
    }
    text = json.dumps(manifest, indent=1) + "\n"
    (out_dir / MANIFEST).write_text(text)
    for index in range(len(writer.parts)):
        (out_dir / part_dir(index) / MANIFEST).write_text(text)
    return manifest


# --------------------------------------------------------------------------------------------
# Checking and installing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise PayloadError(f"{path} is missing; carry the whole part directory made by pack")
    return json.loads(path.read_text())


def check_part(directory: Path, expected_sha256: str | None = None) -> str:
    """Verify the part held in ``directory`` (a ``part-NN`` directory) against its manifest (and
    ``expected_sha256`` when given); returns a one-line account that also names which parts of
    the payload are present beside it."""
    manifest = read_manifest(directory)
    parts = manifest["parts"]
    index = next((i for i, p in enumerate(parts) if p["file"].startswith(directory.name)), None)
    if index is None:
        raise PayloadError(f"{directory} is not one of the parts listed in its {MANIFEST}")
    entry = parts[index]
    path = directory.parent / entry["file"]
    if not path.is_file():
        raise PayloadError(f"{path} is missing")
    digest = sha256_file(path)
    if digest != entry["sha256"] or (expected_sha256 and digest != expected_sha256):
        raise PayloadError(
            f"{path}: sha256 {digest} does not match {expected_sha256 or entry['sha256']}; "
            "transfer it again"
        )
    present = [p["file"].split("/")[0] for p in parts if (directory.parent / p["file"]).is_file()]
    return (
        f"{entry['file']}: {entry['bytes']} bytes, sha256 ok (part {index + 1} of {len(parts)}); "
        f"present: {', '.join(present)}"
    )


def verify(payload: Path, manifest: dict) -> None:
    """Check the sha256 of every part and of the parts together, before anything is unpacked."""
    whole = hashlib.sha256()
    for entry in manifest["parts"]:
        path = payload / entry["file"]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(MIB), b""):
                digest.update(block)
                whole.update(block)
        if digest.hexdigest() != entry["sha256"]:
            raise PayloadError(f"{path}: sha256 differs from {MANIFEST}; transfer it again")
    if whole.hexdigest() != manifest["sha256"]:
        raise PayloadError(f"{payload}: the parts together differ from {MANIFEST}")


def _blocks(payload: Path, manifest: dict) -> Iterator[bytes]:
    """The parts' bytes, in order."""
    for entry in manifest["parts"]:
        with open(payload / entry["file"], "rb") as f:
            yield from iter(lambda f=f: f.read(MIB), b"")


class _XzReader(io.RawIOBase):
    """A readable stream of the decompressed payload (tarfile reads it in stream mode)."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self.blocks, self.decompressor, self.buffer = blocks, lzma.LZMADecompressor(), b""

    def readable(self) -> bool:
        return True

    def readinto(self, out) -> int:
        while not self.buffer:
            if self.decompressor.eof:
                return 0
            block = next(self.blocks, None)
            if block is None:
                raise PayloadError("the payload ends before its xz stream does: a part is missing")
            self.buffer = self.decompressor.decompress(block)
        n = min(len(out), len(self.buffer))
        out[:n] = self.buffer[:n]
        self.buffer = self.buffer[n:]
        return n


def install(payload: Path, dest: Path) -> dict:
    """Verify every part of ``payload`` (the directory holding ``part-NN/``), then unpack the tree
    into ``dest`` (e.g. a venv's site-packages). A stamp in ``dest`` makes a second install of
    the same payload a no-op. Returns the manifest."""
    parts = sorted(payload.glob("part-*/" + MANIFEST))
    if not parts:
        raise PayloadError(f"no part-NN/{MANIFEST} under {payload}; transfer the parts first")
    manifest = json.loads(parts[0].read_text())
    missing = [p["file"] for p in manifest["parts"] if not (payload / p["file"]).is_file()]
    if missing:
        raise PayloadError(f"{payload}: missing {', '.join(missing)}; transfer them first")
    stamp = dest / f".payload-{manifest['name']}-{manifest['sha256'][:16]}"
    if stamp.is_file():
        return manifest
    verify(payload, manifest)
    dest.mkdir(parents=True, exist_ok=True)
    stream = _XzReader(_blocks(payload, manifest))
    with tarfile.open(fileobj=io.BufferedReader(stream, MIB), mode="r|") as tar:
        for member in tar:
            if member.name.startswith("/") or ".." in Path(member.name).parts:
                raise PayloadError(f"refusing to unpack {member.name!r} outside {dest}")
            tar.extract(member, dest, **_extract_args())
    stamp.write_text(json.dumps({"sha256": manifest["sha256"], "files": manifest["files"]}))
    return manifest


def _extract_args() -> dict:
    # Python >= 3.12 (and 3.10.12+/3.11.4+) filters members; "data" refuses links out of dest.
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


# --------------------------------------------------------------------------------------------
# Smoke test: a DALI pipeline from wherever nvidia.dali is found


def smoke(gpu: bool = False, batch: int = 4) -> str:
    """Build and run a DALI pipeline (decode the embedded JPEG, random resized crop, flip,
    normalise to CHW float) on the CPU, or with ``gpu`` nvJPEG decoding and GPU operators; check
    the output's shape. Returns a line naming the DALI version and where it was imported from."""
    import numpy as np
    from nvidia import dali
    from nvidia.dali import fn, types

    height, width = SMOKE_SIZE
    encoded = np.frombuffer(SMOKE_JPEG, dtype=np.uint8)

    @dali.pipeline_def(batch_size=batch, num_threads=1, device_id=0 if gpu else None, seed=0)
    def pipeline():
        jpegs = fn.external_source(source=lambda: [encoded] * batch, dtype=types.UINT8)
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.random_resized_crop(images, size=(8, 8))
        images = fn.flip(images, horizontal=1)
        return fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", mean=[128.0] * 3, std=[64.0] * 3
        )

    pipe = pipeline()
    pipe.build()
    (out,) = pipe.run()
    if gpu:
        out = out.as_cpu()
    shapes = {tuple(out.at(i).shape) for i in range(batch)}
    if shapes != {(3, 8, 8)}:
        raise PayloadError(f"the smoke pipeline gave shapes {shapes}, expected (3, 8, 8)")
    return (
        f"nvidia.dali {dali.__version__} from {Path(dali.__file__).parent}: "
        f"{'GPU (nvJPEG)' if gpu else 'CPU'} pipeline ran {batch} images of "
        f"{height}x{width} -> (3, 8, 8)"
    )


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stage-wheels", help="unpack wheels into a site-packages tree")
    p.add_argument("wheels", nargs="+", type=Path)
    p.add_argument("--dest", type=Path, required=True)
    p = sub.add_parser("stage-installed", help="copy this interpreter's installed dists")
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--dist", nargs="+", default=list(DISTRIBUTIONS))
    p = sub.add_parser("prune", help="drop other Python versions' modules, headers, tests")
    p.add_argument("stage", type=Path)
    p.add_argument("--python", required=True, help="the target's MAJOR.MINOR, e.g. 3.12")
    p.add_argument("--strip", action="store_true", help="also strip --strip-unneeded the .so")
    p = sub.add_parser("pack", help="tar + xz + split into parts with a manifest")
    p.add_argument("stage", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--name", default="dali")
    p.add_argument("--part-mib", type=float, default=60.0)
    p.add_argument("--preset", type=int, default=9, help="xz preset 0-9 (default 9)")
    p = sub.add_parser("check", help="verify one transferred part-NN directory")
    p.add_argument("part", type=Path)
    p.add_argument("--sha256", default=None, help="the sha256 the part must have")
    p = sub.add_parser("install", help="verify all parts and unpack them into DEST")
    p.add_argument("payload", type=Path)
    p.add_argument("dest", type=Path)
    p = sub.add_parser("smoke", help="run a small DALI pipeline")
    p.add_argument("--gpu", action="store_true", help="decode with nvJPEG on GPU 0")
    args = parser.parse_args(argv)
    try:
        if args.command == "stage-wheels":
            for name in stage_wheels(args.wheels, args.dest):
                print(f"staged {name}")
        elif args.command == "stage-installed":
            for name in stage_installed(args.dist, args.dest):
                print(f"staged {name}")
        elif args.command == "prune":
            removed = prune(args.stage, args.python)
            print(f"pruned {removed['files']} files, {removed['bytes'] / MIB:.1f} MiB")
            if args.strip:
                stripped = strip_libraries(args.stage)
                print(f"stripped {stripped['files']} libraries, {stripped['saved'] / MIB:.1f} MiB")
        elif args.command == "pack":
            m = pack(args.stage, args.out, args.name, args.part_mib, args.preset)
            print(
                f"packed {m['files']} files, {m['tar_bytes'] / MIB:.1f} MiB -> "
                f"{m['bytes'] / MIB:.1f} MiB xz in {len(m['parts'])} parts (sha256 {m['sha256']})"
            )
            for part in m["parts"]:
                print(f"  {part['file']}: {part['bytes'] / MIB:.2f} MiB, sha256 {part['sha256']}")
        elif args.command == "check":
            print(check_part(args.part, args.sha256))
        elif args.command == "install":
            m = install(args.payload, args.dest)
            print(
                f"installed {m['name']} ({m['files']} files, sha256 {m['sha256']}) in {args.dest}"
            )
        else:
            print(smoke(gpu=args.gpu))
    except PayloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
