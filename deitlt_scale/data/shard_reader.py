"""A prepared split read back with nothing but :mod:`tarfile`: (encoded image, label) pairs.

For code that must not go through the project's loaders: the plain-loop control
(:mod:`deitlt_scale.benchmarks.control`) and the check that an export scores in plain timm what
training reported (:mod:`deitlt_scale.analysis.timm_check`).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path


def read_split(root: str | Path, split: str) -> list[tuple[bytes, int]]:
    """Every (encoded image, model label) of ``split``, in the order of the shards meta.json
    lists and of the samples inside each."""
    root = Path(root)
    meta = json.loads((root / "meta.json").read_text())
    samples: list[tuple[bytes, int]] = []
    for shard in meta["splits"][split]["shards"]:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(root / shard["name"]) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        samples += [(m["jpg"], int(m["cls"])) for m in members.values()]
    return samples
