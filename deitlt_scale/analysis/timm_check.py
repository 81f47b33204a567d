"""An export scored the way a timm user would score it: nothing of the project but the files.

``timm.create_model("local-dir:EXPORT", pretrained=True)``, timm's own eval transform from the
export's ``pretrained_cfg`` (``resolve_data_config`` + ``create_transform``), PIL decoding of the
prepared split's images (:mod:`deitlt_scale.data.shard_reader`), and the model's default
prediction: for a distilled DeiT in eval mode, timm averages the CLS and DIST heads' logits, the
"mean" head the project's evaluation reports. ``deitlt demo`` prints the two side by side.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch


@torch.no_grad()
def score_export(export: str | Path, data: str | Path, split: str = "eval") -> dict[str, float]:
    """Top-1 accuracy (``overall``) and mean per-class accuracy (``mean_class``) of the
    exported model on ``split`` of the prepared dataset ``data``, fractions."""
    import timm
    from PIL import Image

    from deitlt_scale.data.shard_reader import read_split

    model = timm.create_model(f"local-dir:{Path(export).resolve()}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    samples = read_split(data, split)
    k = model.num_classes
    hits, totals = torch.zeros(k), torch.zeros(k)
    for start in range(0, len(samples), 256):
        chunk = samples[start : start + 256]
        images = torch.stack(
            [transform(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in chunk]
        )
        labels = torch.tensor([y for _, y in chunk])
        predicted = model(images).argmax(dim=1)
        totals += torch.bincount(labels, minlength=k)
        hits += torch.bincount(labels, (predicted == labels).float(), minlength=k)
    present = totals > 0
    return {
        "overall": float(hits.sum() / totals.sum()),
        "mean_class": float((hits[present] / totals[present]).mean()),
    }
