"""Helpers of scripts/gpu_check.sh (run with the GPU check's venv python).

    python scripts/gpu_check.py env             # versions and the features the step relies on
    python scripts/gpu_check.py select-tests    # test files with `gpu` tests that can import here
    python scripts/gpu_check.py make-dataset DIR [--images N --classes C]  # shards + a teacher
    python scripts/gpu_check.py summary LOG     # the benchmarks of a gpu_check log as a table

``select-tests`` imports every test module that has a ``@pytest.mark.gpu`` test; a module whose
imports fail (mlflow is not on the GPU machine; DALI only when its payload was carried) is left
out, and the reason is printed on stderr, so pytest never sees a collection error. The selected
paths go to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# DeiT-B/16 + ResNet-50 teacher at 224 px on one H100 (the project goal).
GOALS = {"step images/s": 3000.0, "step MFU %": 40.0, "x reference": 2.5}


def cmd_env() -> int:
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if not torch.cuda.is_available():
        print("CUDA is not available: this is not a GPU machine")
        return 1
    print(f"device: {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
    for name in ("timm", "torchvision", "triton", "deepspeed", "deitlt_scale"):
        try:
            module = __import__(name)
            print(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError as err:
            print(f"{name}: NOT importable ({err})")
            return 1
    from timm.layers import use_fused_attn

    print(f"timm fused attention (scaled_dot_product_attention): {use_fused_attn()}")
    for name in ("nvidia.dali", "webdataset", "mlflow"):
        try:  # the full dotted name: `nvidia` alone is there with torch's CUDA libraries
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        print(f"{name}: {'present' if found else 'absent (tests that need it are left out)'}")
    return 0


def gpu_test_files() -> list[Path]:
    return sorted(
        p for p in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text()
    )


def cmd_select_tests() -> int:
    sys.path.insert(0, str(REPO / "tests"))  # conftest-style helpers imported by test modules
    selected = []
    for path in gpu_test_files():
        name = f"_gpu_check_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pytest look modules up by name
        try:
            spec.loader.exec_module(module)
        except ImportError as err:
            missing = getattr(err, "name", None) or str(err)
            print(
                f"left out {path.relative_to(REPO)}: importing it needs {missing}, which is not "
                "installed on this machine (DALI comes from build/payload: "
                "scripts/prepare_gpu_payload.sh)",
                file=sys.stderr,
            )
            continue
        finally:
            sys.modules.pop(name, None)
        selected.append(str(path.relative_to(REPO)))
    print(" ".join(selected))
    return 0


def cmd_make_dataset(root: Path, images: int, classes: int) -> int:
    """A prepared dataset of generated 256x320 JPEGs (the ones `deitlt bench data` makes) in 8
    shards, and a teacher file with random ResNet-50 weights in ``root/teacher``."""
    from deitlt_scale.benchmarks.data import generate_shards
    from deitlt_scale.benchmarks.synthetic import write_random_teacher

    root.mkdir(parents=True, exist_ok=True)
    generate_shards(root, images, 8, 256, 320, num_classes=classes)
    teacher = write_random_teacher(root / "teacher", "resnet50", classes, 224)
    print(f"dataset: {images} images, {classes} classes in {root}; teacher: {teacher}")
    return 0


STEP_LINE = re.compile(
    r"^(step|reference): ([0-9.]+) images/s, .*MFU ([0-9.]+)%, peak memory (\d+)"
)
RATIO_LINE = re.compile(r"^ratio step/reference images/s: ([0-9.]+)x")
ABLATION_LINE = re.compile(r"^ratio step\[(.+)\]/step images/s: ([0-9.]+)x")
SECTION = re.compile(r"^== (.+?) \(limit \d+s\)")
# `bench data` prints one DALI line per variant ("dali (gpu, repeated aug 3, decoded per copy)");
# the first is the configuration its "ratio dali/reference" compares.
DATA_LINE = re.compile(
    r"^(dali) \((?:gpu|cpu)(?:, ([^)]*))?\): ([0-9.]+) images/s"
    r"|^(reference) \(.*\): ([0-9.]+) images/s"
)
DATA_RATIO_LINE = re.compile(r"^ratio dali/reference: ([0-9.]+)x")
# `deitlt train` logs one line per log window; the last one is past compilation and warm-up.
TRAIN_LINE = re.compile(r"^\[step \d+/\d+\] .*\bimages_per_s=([0-9.e+]+)")
DATA_WAIT = re.compile(r"\bdata_wait_fraction=([0-9.e+-]+)")


def parse_benchmarks(text: str) -> dict[str, dict[str, float]]:
    """``{section name: {"step images/s", "step MFU %", ...}}`` for every bench section."""
    results: dict[str, dict[str, float]] = {}
    section = None
    for line in text.splitlines():
        head = SECTION.match(line)
        if head:
            section = head.group(1)
            continue
        if section is None:
            continue
        step = STEP_LINE.match(line)
        if step:
            name, rate, mfu, peak = step.groups()
            figures = results.setdefault(section, {})
            figures[f"{name} images/s"] = float(rate)
            figures[f"{name} MFU %"] = float(mfu)
            figures[f"{name} peak MiB"] = float(peak)
        ratio = RATIO_LINE.match(line)
        if ratio:
            results.setdefault(section, {})["x reference"] = float(ratio.group(1))
        ablation = ABLATION_LINE.match(line)
        if ablation:
            variant, value = ablation.groups()
            results.setdefault(section, {})[f"variant {variant}"] = float(value)
        data = DATA_LINE.match(line)
        if data:
            figures = results.setdefault(section, {})
            if data.group(1):
                variant, rate = data.group(2), data.group(3)
                if "dali images/s" in figures and variant:
                    figures[f"dali {variant} images/s"] = float(rate)
                else:
                    figures["dali images/s"] = float(rate)
            else:
                figures["reference images/s"] = float(data.group(5))
        data_ratio = DATA_RATIO_LINE.match(line)
        if data_ratio:
            results.setdefault(section, {})["x reference"] = float(data_ratio.group(1))
        train = TRAIN_LINE.match(line)
        if train:
            figures = results.setdefault(section, {})
            figures["train images/s"] = float(train.group(1))
            wait = DATA_WAIT.search(line)
            if wait:
                figures["train data wait %"] = 100 * float(wait.group(1))
    return results


def cmd_summary(log: Path) -> int:
    results = parse_benchmarks(log.read_text(errors="replace"))
    if not results:
        print("no benchmark figures in the log")
        return 1
    columns = ("step images/s", "reference images/s", "x reference", "step MFU %", "step peak MiB")
    print(f"{'benchmark':44s} " + " ".join(f"{c:>18s}" for c in columns))
    for section, figures in results.items():
        if "step images/s" not in figures:
            continue
        cells = " ".join(f"{figures.get(c, float('nan')):18.2f}" for c in columns)
        print(f"{section[:44]:44s} {cells}")
    for section, figures in results.items():
        if "dali images/s" in figures:
            print(
                f"{section[:44]:44s} DALI {figures['dali images/s']:.1f} images/s, reference "
                f"{figures.get('reference images/s', float('nan')):.1f} images/s, "
                f"{figures.get('x reference', float('nan')):.2f}x"
            )
        if "train images/s" in figures:
            print(
                f"{section[:44]:44s} last log window {figures['train images/s']:.1f} images/s, "
                f"data wait {figures.get('train data wait %', float('nan')):.1f}%"
            )
    for section, figures in results.items():
        for key, value in figures.items():
            if key.startswith("variant "):
                variant = key.removeprefix("variant ")
                print(f"{section[:44]:44s} step[{variant}] / step images/s: {value:.2f}x")
    base = next((f for s, f in results.items() if "DeiT-B" in s), None)
    if base is None:
        print("goal: no DeiT-B figures (the DeiT-B benchmark did not finish)")
        return 1
    met = True
    for key, goal in GOALS.items():
        value = base.get(key)
        ok = value is not None and value >= goal
        met &= ok
        print(f"goal DeiT-B {key} >= {goal:g}: {'met' if ok else 'NOT met'} ({value})")
    return 0 if met else 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions and the features the step relies on")
    sub.add_parser("select-tests", help="test files with gpu tests that import here")
    dataset = sub.add_parser("make-dataset", help="generated shards and a random teacher")
    dataset.add_argument("root", type=Path, help="directory to write")
    dataset.add_argument("--images", type=int, default=2048, help="training images (2048)")
    dataset.add_argument("--classes", type=int, default=100, help="classes (100)")
    summary = sub.add_parser("summary", help="the step benchmarks of a gpu_check log")
    summary.add_argument("log", type=Path, help="the gpu_check log file")
    args = parser.parse_args()
    if args.command == "env":
        return cmd_env()
    if args.command == "select-tests":
        return cmd_select_tests()
    if args.command == "make-dataset":
        return cmd_make_dataset(args.root, args.images, args.classes)
    return cmd_summary(args.log)


if __name__ == "__main__":
    sys.exit(main())
