"""A synthetic HAM10000 in the real release's layout, for the tiny preset and the tests.

Each class has its own lesion colour and shape, so a tiny model can learn it; images of one lesion
look alike (same lesion, new jitter), as the real dataset's several images per lesion do.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from medlava.io import InputError

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
# Real lesion counts per class (REFERENCE.md), floored so every class has several lesions.
_WEIGHTS = np.array([327, 514, 1099, 115, 1113, 6705, 142], dtype=float)
_COLOURS = {"akiec": (200, 90, 60), "bcc": (230, 170, 190), "bkl": (150, 110, 60), "df": (120, 80, 120),
            "mel": (40, 25, 20), "nv": (110, 70, 40), "vasc": (200, 20, 40)}
_SHAPES = {"akiec": "square", "bcc": "ring", "bkl": "triangle", "df": "diamond", "mel": "blob", "nv": "ellipse",
           "vasc": "cross"}
_LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot",
                  "unknown", "neck", "scalp", "hand", "ear", "genital", "acral")
MARKER = ".medlava-synthetic"


def _draw(dx: str, size: int, rng: np.random.Generator, centre: tuple[float, float], radius: float) -> Image.Image:
    skin = np.array([224, 180, 150]) + rng.normal(0, 8, 3)
    pixels = np.clip(skin + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels)
    d = ImageDraw.Draw(im)
    cx, cy = (c + rng.normal(0, 0.03) for c in centre)
    cx, cy, r = cx * size, cy * size, radius * size * rng.uniform(0.9, 1.1)
    colour = tuple(int(np.clip(c + rng.normal(0, 10), 0, 255)) for c in _COLOURS[dx])
    shape = _SHAPES[dx]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "ring":
        d.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "blob":
        pts = [(cx + r * rng.uniform(0.6, 1.2) * np.cos(a), cy + r * rng.uniform(0.6, 1.2) * np.sin(a))
               for a in np.linspace(0, 2 * np.pi, 9)[:-1]]
        d.polygon(pts, fill=colour)
    elif shape == "ellipse":
        d.ellipse((cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r), fill=colour)
    else:  # cross
        w = r / 3
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    return im


def make_synthetic_ham10000(root: Path, n_lesions: int = 150, max_images_per_lesion: int = 3,
                            image_size: int = 64, seed: int = 0) -> Path:
    """Write `root/HAM10000_metadata.csv` and `root/HAM10000_images_part_{1,2}/ISIC_*.jpg`; idempotent."""
    root = Path(root)
    if (root / MARKER).exists():
        return root
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root} exists and is not a synthetic HAM10000 written by medlava; refusing to "
                         "overwrite it. Point data.root elsewhere or remove data.synthetic")
    rng = np.random.default_rng(seed)
    floor = max(3, n_lesions // 20)
    counts = np.maximum(floor, np.floor(_WEIGHTS / _WEIGHTS.sum() * n_lesions)).astype(int)
    counts[CLASSES.index("nv")] += max(0, n_lesions - counts.sum())
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rows, image_no = [], 24306
    for dx, n in zip(CLASSES, counts):
        for _ in range(n):
            lesion = f"HAM_{rng.integers(0, 10**7):07d}"
            centre, radius = tuple(rng.uniform(0.35, 0.65, 2)), rng.uniform(0.15, 0.3)
            age = float(rng.integers(1, 17) * 5) if rng.random() > 0.03 else None
            sex = rng.choice(["male", "female", "unknown"], p=[0.53, 0.45, 0.02])
            loc = rng.choice(_LOCALIZATIONS)
            dx_type = rng.choice(["histo", "follow_up", "consensus", "confocal"], p=[0.53, 0.37, 0.09, 0.01])
            for _ in range(int(rng.integers(1, max_images_per_lesion + 1))):
                image_id = f"ISIC_{image_no:07d}"
                image_no += 1
                part = tmp / ("HAM10000_images_part_1" if image_no % 2 else "HAM10000_images_part_2")
                part.mkdir(parents=True, exist_ok=True)
                _draw(dx, image_size, rng, centre, radius).save(part / f"{image_id}.jpg", quality=92)
                rows.append({"lesion_id": lesion, "image_id": image_id, "dx": dx, "dx_type": dx_type, "age": age,
                             "sex": sex, "localization": loc})
    pd.DataFrame(rows).to_csv(tmp / "HAM10000_metadata.csv", index=False)
    (tmp / MARKER).write_text(f"seed={seed} n_lesions={n_lesions}\n")
    if root.exists():
        root.rmdir()
    os.replace(tmp, root)
    return root
