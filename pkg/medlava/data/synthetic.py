"""A synthetic HAM10000 in the real release's layout, for the tiny preset, benchmarks and tests.

Each class has its own lesion colour and shape, so a tiny model can learn it; the images of one lesion share
its skin, colour, place and size and differ by small jitter and noise, as the real release's several
images per lesion do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from medlava.artifacts import atomic_dir
from medlava.config import SyntheticDataConfig
from medlava.data.ham10000 import CLASSES, COLUMNS, IMAGE_DIRS, METADATA
from medlava.io import InputError

log = logging.getLogger(__name__)

MARKER = ".medlava-synthetic.json"
"""Written last inside the temp tree: a root holding it is a complete synthetic dataset."""
FIRST_IMAGE = 24306  # the real release's image ids run ISIC_0024306 .. ISIC_0034320

# Frequencies of the real release (Tschandl et al. 2018), used as sampling weights.
_DX_WEIGHTS = np.array([327, 514, 1099, 115, 1113, 6705, 142], dtype=float)  # in CLASSES order
_DX_TYPES = {"histo": 5340, "follow_up": 3704, "consensus": 902, "confocal": 69}
_SEXES = {"male": 5406, "female": 4552, "unknown": 57}
_LOCALIZATIONS = {
    "back": 2192,
    "lower extremity": 2077,
    "trunk": 1404,
    "upper extremity": 1118,
    "abdomen": 1022,
    "face": 745,
    "chest": 407,
    "foot": 319,
    "unknown": 234,
    "neck": 168,
    "scalp": 128,
    "hand": 90,
    "ear": 56,
    "genital": 48,
    "acral": 7,
}
_MISSING_AGE = 0.03  # the real rate is 0.6%; higher so small sets have some

_COLOURS = {
    "akiec": (205, 95, 70),
    "bcc": (235, 120, 170),
    "bkl": (165, 125, 60),
    "df": (125, 80, 125),
    "mel": (45, 30, 30),
    "nv": (115, 75, 45),
    "vasc": (190, 20, 50),
}
_SHAPES = {
    "akiec": lambda d, x, y, r, c, _: d.rectangle((x - r, y - r, x + r, y + r), fill=c),
    "bcc": lambda d, x, y, r, c, _: d.ellipse((x - r, y - r, x + r, y + r), outline=c, width=max(2, round(r / 3))),
    "bkl": lambda d, x, y, r, c, _: d.regular_polygon((x, y, r), 3, fill=c),
    "df": lambda d, x, y, r, c, _: d.regular_polygon((x, y, r), 4, rotation=45, fill=c),
    # an irregular border: 8 vertices at the lesion's own radii
    "mel": lambda d, x, y, r, c, radii: d.polygon(
        [(x + r * k * np.cos(a), y + r * k * np.sin(a)) for k, a in zip(radii, np.linspace(0, 2 * np.pi, 9)[:-1])],
        fill=c,
    ),
    "nv": lambda d, x, y, r, c, _: d.ellipse((x - r, y - 0.7 * r, x + r, y + 0.7 * r), fill=c),
    "vasc": lambda d, x, y, r, c, _: (
        d.rectangle((x - r, y - r / 3, x + r, y + r / 3), fill=c),
        d.rectangle((x - r / 3, y - r, x + r / 3, y + r), fill=c),
    ),
}


def _choice(rng: np.random.Generator, freq: dict[str, int]) -> str:
    p = np.array(list(freq.values()), dtype=float)
    return str(rng.choice(list(freq), p=p / p.sum()))


def _lesions_per_class(n_lesions: int) -> np.ndarray:
    """The real skew, but every class gets a floor of lesions so each split can hold some; sums to n_lesions."""
    floor = min(n_lesions // len(CLASSES), max(3, n_lesions // 20))
    share = _DX_WEIGHTS / _DX_WEIGHTS.sum() * (n_lesions - floor * len(CLASSES))
    counts = floor + np.floor(share).astype(int)
    counts[CLASSES.index("nv")] += n_lesions - counts.sum()
    return counts


def _draw(dx: str, lesion: dict, size: int, rng: np.random.Generator) -> Image.Image:
    im = Image.new("RGB", (size, size), lesion["skin"])
    x, y = (lesion["centre"] + rng.normal(0, 0.03, 2)) * size
    r = lesion["radius"] * size * rng.uniform(0.9, 1.1)
    _SHAPES[dx](ImageDraw.Draw(im), x, y, r, lesion["colour"], lesion["radii"])
    noisy = np.asarray(im, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _build(tmp: Path, n_lesions: int, max_images_per_lesion: int, image_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dxs = np.repeat(CLASSES, _lesions_per_class(n_lesions))
    n_images = rng.integers(1, max_images_per_lesion + 1, n_lesions)
    image_nos = FIRST_IMAGE + rng.permutation(n_images.sum())  # ids not in class order, as in the real release
    part_2_from = FIRST_IMAGE + (n_images.sum() + 1) // 2  # lower half of the ids in part 1, as in the release
    for d in IMAGE_DIRS[:2]:
        (tmp / d).mkdir()
    rows = []
    for dx, lesion_no, lesion_images in zip(
        dxs, rng.permutation(n_lesions), np.split(image_nos, np.cumsum(n_images)[:-1])
    ):
        lesion = {
            "skin": tuple(int(v) for v in np.array([224, 180, 150]) + rng.normal(0, 10, 3)),
            "colour": tuple(int(v) for v in np.clip(np.array(_COLOURS[dx]) + rng.normal(0, 8, 3), 0, 255)),
            "centre": rng.uniform(0.35, 0.65, 2),
            "radius": rng.uniform(0.15, 0.3),
            "radii": rng.uniform(0.6, 1.2, 8),
        }
        meta = {
            "lesion_id": f"HAM_{lesion_no:07d}",
            "dx": dx,
            "dx_type": _choice(rng, _DX_TYPES),
            "age": None if rng.random() < _MISSING_AGE else float(5 * rng.integers(0, 18)),
            "sex": _choice(rng, _SEXES),
            "localization": _choice(rng, _LOCALIZATIONS),
        }
        for image_no in lesion_images:
            image_id = f"ISIC_{image_no:07d}"
            folder = IMAGE_DIRS[0] if image_no < part_2_from else IMAGE_DIRS[1]
            _draw(dx, lesion, image_size, rng).save(tmp / folder / f"{image_id}.jpg", quality=92)
            rows.append({"image_id": image_id, **meta})
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(tmp / METADATA, index=False)


def make_synthetic_ham10000(
    root: Path, n_lesions: int = 150, max_images_per_lesion: int = 3, image_size: int = 64, seed: int = 0
) -> Path:
    """Write `root/HAM10000_metadata.csv` and `root/HAM10000_images_part_{1,2}/ISIC_*.jpg`, deterministic for
    `seed`. Built in a temp dir beside `root` and renamed into place; a complete one at `root` is reused."""
    root = Path(root)
    params = {
        "n_lesions": n_lesions,
        "max_images_per_lesion": max_images_per_lesion,
        "image_size": image_size,
        "seed": seed,
    }
    if n_lesions < 2 * len(CLASSES) or max_images_per_lesion < 1 or image_size < 16:
        raise ValueError(
            f"synthetic HAM10000 needs n_lesions >= {2 * len(CLASSES)}, max_images_per_lesion >= 1 "
            f"and image_size >= 16; got {params}"
        )
    if (root / MARKER).is_file():
        made = json.loads((root / MARKER).read_text())
        if made != params:
            log.warning("%s already holds a synthetic HAM10000 made with %s; reusing it, not %s", root, made, params)
        return root
    if root.exists() and not (root.is_dir() and not any(root.iterdir())):
        raise InputError(
            f"{root} exists and is not a synthetic HAM10000 written by medlava (no {MARKER}); "
            "refusing to overwrite it. Point data.root at a new directory, or drop data.synthetic "
            "to use the data there"
        )
    with atomic_dir(root, exists="keep") as tmp:  # another process may finish first: theirs is used
        _build(tmp, n_lesions, max_images_per_lesion, image_size, seed)
        (tmp / MARKER).write_text(json.dumps(params) + "\n")
    return root


def ensure_synthetic_ham10000(root: Path, s: SyntheticDataConfig) -> None:
    """data.synthetic: write the release at `root` when nothing is there yet (the tiny preset, `make demo`)."""
    if root.exists():
        return
    make_synthetic_ham10000(
        root, n_lesions=s.n_lesions, max_images_per_lesion=s.max_images_per_lesion, image_size=s.image_size, seed=s.seed
    )
    log.info("wrote a synthetic HAM10000 (%d lesions) to %s", s.n_lesions, root)
