"""The DALI payload for the GPU check (scripts/payload.py): pruned, packed, cut into parts,
checked part by part, and rebuilt from the parts alone into a DALI that imports and runs.

The payload here is made from this environment's own DALI (CPython 3.11) with the same code
that scripts/prepare_gpu_payload.sh runs on the CPython 3.12 wheels; xz preset 0 keeps it quick.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "payload.py"
spec = importlib.util.spec_from_file_location("payload", SCRIPT)
payload = importlib.util.module_from_spec(spec)
sys.modules["payload"] = payload  # dataclasses and pickling look modules up by name
spec.loader.exec_module(payload)

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
PART_MIB = 24.0


def _tree(root: Path, sizes: dict[str, int]) -> Path:
    """Files of the given sizes with incompressible contents (so parts fill up)."""
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    return root


def _image_standin(dest: Path) -> Path:
    """A directory exposing only what the GPU image provides to DALI (numpy, packaging, pyyaml,
    typing-extensions, six), by links to this environment's copies: no nvidia package in it."""
    dest.mkdir()
    for name in payload.IMAGE_PROVIDES:
        dist = importlib.metadata.distribution(name)
        root = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or () if not str(f).startswith("..")}:
            if not (dest / top).exists() and (root / top).exists():
                (dest / top).symlink_to(root / top)
    assert not (dest / "nvidia").exists()
    return dest


def _python_with(paths: list[Path], *args: str) -> subprocess.CompletedProcess:
    """Run this interpreter without site-packages (-S), seeing only ``paths`` and the stdlib."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths))}
    return subprocess.run(
        [sys.executable, "-S", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def dali_payload(tmp_path_factory) -> Path:
    """This environment's DALI and its dependencies, staged, pruned, stripped and packed."""
    work = tmp_path_factory.mktemp("payload")
    stage = work / "stage"
    payload.stage_installed(payload.DISTRIBUTIONS, stage)
    payload.prune(stage, PYTHON)
    payload.strip_libraries(stage)
    payload.pack(stage, work / "out", "dali-test", PART_MIB, preset=0)
    shutil.rmtree(stage)
    return work / "out"


@pytest.fixture(scope="module")
def reassembled(dali_payload, tmp_path_factory) -> Path:
    """The payload rebuilt in a clean directory from copies of its part directories alone."""
    work = tmp_path_factory.mktemp("reassembled")
    carried = work / "carried"
    for part in sorted(dali_payload.glob("part-*")):
        shutil.copytree(part, carried / part.name)
    site = work / "site"
    payload.install(carried, site)
    return site


# --------------------------------------------------------------------------------------------
# Packing and checking, on small trees


def test_parts_are_at_most_the_part_size_and_add_up_to_the_stream(tmp_path):
    tree = _tree(tmp_path / "t", {"a/x.bin": 50_000, "a/y.bin": 30_000, "b.txt": 10})
    manifest = payload.pack(tree, tmp_path / "out", "t", part_mib=20_000 / payload.MIB, preset=0)
    sizes = [p["bytes"] for p in manifest["parts"]]
    assert len(sizes) >= 4
    assert max(sizes) <= 20_000 and all(s == 20_000 for s in sizes[:-1])
    assert sum(sizes) == manifest["bytes"]
    for index, part in enumerate(manifest["parts"]):
        directory = tmp_path / "out" / payload.part_dir(index)
        assert (directory / payload.MANIFEST).is_file()
        assert payload.sha256_file(tmp_path / "out" / part["file"]) == part["sha256"]


def test_install_rebuilds_the_tree_byte_for_byte(tmp_path):
    tree = _tree(tmp_path / "t", {"pkg/lib.so.1": 70_000, "pkg/__init__.py": 5, "m.py": 1})
    payload.pack(tree, tmp_path / "out", "t", part_mib=16_000 / payload.MIB, preset=0)
    payload.install(tmp_path / "out", tmp_path / "site")
    for path in tree.rglob("*"):
        if path.is_file():
            rel = path.relative_to(tree)
            assert (tmp_path / "site" / rel).read_bytes() == path.read_bytes(), rel


def test_check_names_the_part_and_the_parts_present_beside_it(tmp_path):
    tree = _tree(tmp_path / "t", {"x.bin": 40_000})
    manifest = payload.pack(tree, tmp_path / "out", "t", part_mib=16_000 / payload.MIB, preset=0)
    assert len(manifest["parts"]) == 3
    shutil.rmtree(tmp_path / "out" / "part-02")
    line = payload.check_part(tmp_path / "out" / "part-01", manifest["parts"][1]["sha256"])
    assert "part 2 of 3" in line and "present: part-00, part-01" in line


def test_check_rejects_a_part_with_another_checksum(tmp_path):
    tree = _tree(tmp_path / "t", {"x.bin": 40_000})
    manifest = payload.pack(tree, tmp_path / "out", "t", part_mib=16_000 / payload.MIB, preset=0)
    part = tmp_path / "out" / manifest["parts"][0]["file"]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(payload.PayloadError, match="does not match"):
        payload.check_part(part.parent)


def test_check_rejects_a_part_that_differs_from_the_expected_checksum(tmp_path):
    tree = _tree(tmp_path / "t", {"x.bin": 1000})
    payload.pack(tree, tmp_path / "out", "t", part_mib=1.0, preset=0)
    with pytest.raises(payload.PayloadError, match="does not match"):
        payload.check_part(tmp_path / "out" / "part-00", "0" * 64)


def test_install_refuses_a_payload_with_a_missing_part(tmp_path):
    tree = _tree(tmp_path / "t", {"x.bin": 40_000})
    payload.pack(tree, tmp_path / "out", "t", part_mib=16_000 / payload.MIB, preset=0)
    shutil.rmtree(tmp_path / "out" / "part-01")
    with pytest.raises(payload.PayloadError, match="missing part-01"):
        payload.install(tmp_path / "out", tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_install_refuses_a_corrupted_part_before_unpacking_anything(tmp_path):
    tree = _tree(tmp_path / "t", {"x.bin": 40_000})
    manifest = payload.pack(tree, tmp_path / "out", "t", part_mib=16_000 / payload.MIB, preset=0)
    part = tmp_path / "out" / manifest["parts"][2]["file"]
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(payload.PayloadError, match="part-02.*sha256 differs"):
        payload.install(tmp_path / "out", tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_prune_keeps_one_python_version_and_drops_headers_and_tests(tmp_path):
    tree = _tree(
        tmp_path / "t",
        {
            "nvidia/dali/backend_impl.cpython-311-x86_64-linux-gnu.so": 10,
            "nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so": 10,
            "nvidia/dali/backend_impl.cpython-314t-x86_64-linux-gnu.so": 10,
            "nvidia/dali/libdali.so": 10,
            "nvidia/dali/include/dali/core.h": 10,
            "nvidia/libnvcomp/lib64/libnvcomp_static.a": 10,
            "nvidia/libnvcomp/bin/nvlzcat": 10,
            "pkg/tests/test_x.py": 10,
            "pkg/__pycache__/m.cpython-311.pyc": 10,
            "pkg/m.py": 10,
            "pkg-1.0.dist-info/RECORD": 10,
        },
    )
    payload.prune(tree, "3.12")
    left = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
    assert left == [
        "nvidia/__init__.py",
        "nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so",
        "nvidia/dali/libdali.so",
        "pkg-1.0.dist-info/RECORD",
        "pkg/m.py",
    ]


# --------------------------------------------------------------------------------------------
# The real DALI, rebuilt from its parts


@pytest.mark.slow
def test_dali_payload_parts_fit_the_transfer_limit(dali_payload):
    manifest = json.loads((dali_payload / payload.MANIFEST).read_text())
    assert len(manifest["parts"]) >= 2
    assert all(p["bytes"] <= PART_MIB * payload.MIB for p in manifest["parts"])
    for part in manifest["parts"]:
        assert payload.check_part((dali_payload / part["file"]).parent, part["sha256"])


@pytest.mark.slow
def test_reassembled_dali_runs_a_cpu_pipeline_with_nothing_else_on_the_path(reassembled, tmp_path):
    standin = _image_standin(tmp_path / "image")
    result = _python_with(
        [reassembled, standin],
        "-c",
        "import sys; sys.path.insert(0, sys.argv[1]); import payload; print(payload.smoke()); "
        "maps = open('/proc/self/maps').read().split(); "
        "print('\\n'.join(sorted({m for m in maps if 'libdali' in m})))",
        str(SCRIPT.parent),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert f"from {reassembled}/nvidia/dali: CPU pipeline ran 4 images" in lines[0]
    libraries = lines[1:]
    assert libraries and all(line.startswith(str(reassembled)) for line in libraries)


@pytest.mark.slow
def test_reassembled_dali_comes_first_and_other_nvidia_packages_stay_importable(reassembled):
    """The GPU machine's layout: the payload in the venv, the image's site-packages after it."""
    site_packages = Path(importlib.metadata.distribution("nvidia-cudnn-cu13").locate_file(""))
    result = _python_with(
        [reassembled, site_packages],
        "-c",
        "import importlib.util, nvidia.dali; print(nvidia.dali.__file__); "
        "print(list(importlib.util.find_spec('nvidia.cudnn').submodule_search_locations)[0])",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dali_file, cudnn_file = result.stdout.splitlines()
    assert dali_file.startswith(str(reassembled))
    assert cudnn_file.startswith(str(site_packages))


@pytest.mark.slow
def test_a_second_install_of_the_same_payload_is_a_no_op(dali_payload, reassembled):
    marker = reassembled / "nvidia" / "dali" / "__init__.py"
    before = marker.stat().st_mtime_ns
    payload.install(dali_payload, reassembled)
    assert marker.stat().st_mtime_ns == before
