"""SLAKE (seed 001) -> VQA samples: the local release (train.json, validate.json or validation.json,
test.json, imgs/xmlabN/{source.jpg,mask.png,detection.json}, KG/en_*.csv) or a local copy of the Hugging Face
`BoKelvin/SLAKE` read with `datasets`. English questions by default; OPEN/CLOSED becomes meta.task, and
answer_type / content_type / modality stay in meta for the VQA metrics; the official split is kept (by image)."""

from __future__ import annotations

import logging
import re
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from medlava.config import Config, SlakeConfig
from medlava.data.benchmark import closed_choices
from medlava.data.images import BadImage, load_image, pad_to_square, resolve_image
from medlava.data.prepare import Loaded
from medlava.data.problems import Problems, read_json_records, read_text
from medlava.io import InputError

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": ("train.json",), "val": ("validate.json", "validation.json"), "test": ("test.json",)}
HF_SPLITS = {"train": ("train",), "val": ("validation", "validate", "val"), "test": ("test",)}
FIELDS = (
    "img_id",
    "img_name",
    "question",
    "answer",
    "q_lang",
    "location",
    "modality",
    "answer_type",
    "base_type",
    "content_type",
    "triple",
    "qid",
)
REQUIRED = ("img_name", "question", "answer", "answer_type", "q_lang", "qid")
KG_FILES = ("en_disease.csv", "en_organ.csv", "en_organ_rel.csv")
_PLACEHOLDERS = {"vhead", "_", ""}


def read_kg(folder: Path) -> list[tuple[str, str, str]]:
    """(head, relation, tail) rows of SLAKE's '#'-separated KG files."""
    rows = []
    for name in KG_FILES:
        for i, line in enumerate(read_text(folder / name).splitlines()):
            parts = [p.strip() for p in line.split("#", 2)]  # hand-split: tails may hold commas and quotes
            if len(parts) == 3 and not (i == 0 and parts[1].lower() in ("attribute", "relation")):
                rows.append((parts[0], parts[1], parts[2]))
    if not rows:
        raise InputError(f"{folder}: no KG triples in {', '.join(KG_FILES)} (data.slake.kg=facts needs them)")
    return rows


def knowledge(rec: dict, mode: str, kg: list[tuple[str, str, str]] | None, max_facts: int) -> str:
    triple = [str(t) for t in (rec.get("triple") or [])]
    if len(triple) != 3 or triple[1] in _PLACEHOLDERS:
        return ""
    if mode == "triple":
        return f"({', '.join(triple)})"
    question = rec["question"].lower()
    facts = [
        f"{h} {r}: {t}"
        for h, r, t in kg or ()
        if r.lower() == triple[1].lower()
        and (h.lower() == triple[0].lower() or re.search(rf"\b{re.escape(h.lower())}\b", question))
    ]
    return "; ".join(facts[:max_facts])


def _local_records(root: Path, problems: Problems) -> dict[str, list[tuple[str, dict]]]:
    out = {}
    for split, names in SPLIT_FILES.items():
        path = next((root / n for n in names if (root / n).exists()), root / names[0])
        try:
            out[split] = read_json_records(path, problems)
        except InputError as e:
            problems.fatal(e)  # the other split files are still checked
            out[split] = []
    return out


def _hf_records(root: Path) -> dict[str, list[tuple[str, dict]]]:
    try:
        import datasets
    except ImportError:
        raise InputError(
            "data.slake.source=hf reads with the `datasets` package: pip install 'medlava[data]'"
        ) from None
    if not root.is_dir():
        raise InputError(f"{root} is not a folder: data.root must be a local copy of BoKelvin/SLAKE")
    with tempfile.TemporaryDirectory() as cache:  # the arrow cache is only needed while reading
        try:
            dd = (
                datasets.load_from_disk(str(root))
                if (root / "dataset_dict.json").exists()
                else datasets.load_dataset(str(root), cache_dir=cache)
            )
        except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
            raise InputError(f"{root}: not a readable Hugging Face copy of SLAKE ({e})") from None
        out = {}
        for split, names in HF_SPLITS.items():
            name = next((n for n in names if n in dd), None)
            if name is None:
                raise InputError(f"{root}: no {'/'.join(names)} split (has {list(dd)})")
            out[split] = [(f"{root} [{name}] row {i}", r) for i, r in enumerate(dd[name].to_list())]
    return out


def _condition(source: Image.Image, mask_path: Path, mode: str, margin: float) -> tuple[Image.Image, Image.Image, bool]:
    """(what the model sees, the mask, whether the mask had any foreground). crop: the box of every labelled
    pixel plus `margin`; masked: unlabelled pixels black."""
    mask = load_image(mask_path).convert("L")
    if mask.size != source.size:
        mask = mask.resize(source.size, Image.NEAREST)
    m = np.asarray(mask) > 0
    if not m.any():
        return source, mask, False
    if mode == "crop":
        ys, xs = np.nonzero(m)
        dx, dy = margin * (xs.max() - xs.min() + 1), margin * (ys.max() - ys.min() + 1)
        box = (
            max(0, int(xs.min() - dx)),
            max(0, int(ys.min() - dy)),
            min(source.width, int(xs.max() + 1 + dx)),
            min(source.height, int(ys.max() + 1 + dy)),
        )
        return source.crop(box), mask, True
    a = np.asarray(source).copy()
    a[~m] = 0
    return Image.fromarray(a), mask, True


def _debug(source: Image.Image, mask: Image.Image, seen: Image.Image, path: Path, size: int = 336) -> None:
    """source | mask over source (red) | what the model sees after `pad` to a square, side by side."""
    overlay = source.copy()
    red = Image.new("RGB", source.size, (255, 0, 0))
    overlay.paste(red, mask=mask.point(lambda v: 110 if v else 0))
    mean = tuple(int(255 * m) for m in (0.48145466, 0.4578275, 0.40821073))  # CLIP's mean colour
    panels = [pad_to_square(im, mean).resize((size, size)) for im in (source, overlay, seen)]
    sheet = Image.new("RGB", (3 * size, size))
    for i, p in enumerate(panels):
        sheet.paste(p, (i * size, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _sample(rec: dict, split: str, image: str, o: SlakeConfig, kg: list | None, stats: Counter) -> dict:
    question, answer = str(rec["question"]).strip(), str(rec["answer"]).strip()
    task = str(rec["answer_type"]).strip().lower()
    meta = {
        "dataset": "slake",
        "split": split,
        "task": task,
        "answer": answer,
        "group": str(rec["img_name"]),
        **{k: rec.get(k) for k in FIELDS if k not in ("question", "answer")},
    }
    if task == "closed":
        evident = closed_choices(question, answer)
        if evident:
            meta["choices"], answer = evident
            meta["answer"] = answer
        stats["closed_with_choices" if evident else "closed_without_choices"] += 1
    know = knowledge(rec, o.kg, kg, o.kg_max_facts) if o.kg != "none" else ""
    stats["with_knowledge"] += bool(know)
    prompt = (
        "<image>\n"
        + (f"Knowledge: {know}\n" if know else "")
        + question
        + (f" {o.instruction}" if o.instruction else "")
    )
    return {
        "id": str(rec["qid"]),
        "image": image,
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
        "meta": meta,
    }


def load(cfg: Config, problems: Problems, out_dir: Path) -> Loaded:
    d, o = cfg.data, cfg.data.slake
    root = Path(d.root)
    source_root = d.image_dir(root / "imgs")
    records = _local_records(root, problems) if o.source == "local" else _hf_records(root)
    kg = read_kg(root / "KG") if o.kg == "facts" else None
    conditioned = o.mask != "none" and not problems.check
    loaded = Loaded("slake", out_dir / "images" if conditioned else source_root, group_name="img_name")
    stats: Counter[str] = Counter()
    made: dict[str, str | BadImage] = {}  # source image -> conditioned image, or why it is unusable
    for split, rows in records.items():
        for where, rec in rows:
            missing = [k for k in REQUIRED if rec.get(k) is None or str(rec[k]).strip() == ""]
            if missing:
                problems.add("bad_record", where, f"no {', '.join(missing)} (SLAKE fields: {', '.join(FIELDS)})")
                continue
            lang, kind = str(rec["q_lang"]), str(rec["answer_type"]).strip().upper()
            if lang not in ("en", "zh") or kind not in ("OPEN", "CLOSED"):
                problems.add(
                    "unknown_label", where, f"q_lang {lang!r} / answer_type {kind!r}: expected en|zh and OPEN|CLOSED"
                )
                continue
            if o.language != "all" and lang != o.language:
                stats["other_language"] += 1
                continue
            image = str(rec["img_name"])
            if o.mask != "none":
                first = image not in made
                if first:
                    made[image] = _masked(rec, source_root, out_dir, o, conditioned, stats, len(made))
                if isinstance(made[image], BadImage):
                    err = made[image]
                    if first or err.reason in problems.skip:  # reported once, but every skipped question counted
                        problems.add(err.reason, where, str(err))
                    continue
                image = made[image]
            loaded.add(_sample(rec, split, image, o, kg, stats), where)
    loaded.summary = {
        "source": o.source,
        "language": o.language,
        "kg": o.kg,
        "mask": o.mask,
        "split": {"official": True, "group": "img_name"},
        "stats": dict(sorted(stats.items())),
    }
    log.info("slake: %d questions (%s)", len(loaded.samples), dict(stats))
    return loaded


def _masked(
    rec: dict, source_root: Path, out_dir: Path, o: SlakeConfig, write: bool, stats: Counter, n_made: int
) -> str | BadImage:
    """The conditioned image's path under out_dir/images (written unless checking), or why the source or its
    mask cannot be used."""
    rel = str(rec["img_name"])
    try:
        src_path = resolve_image(source_root, rel)
        mask_path = src_path.parent / "mask.png"
        source = load_image(src_path, str(rec["qid"]))
        seen, mask, found = _condition(source, mask_path, o.mask, o.mask_margin)
    except BadImage as e:
        return e
    stats["empty_mask" if not found else "masked_images"] += 1
    if not write:  # checking: the sources are what gets checked
        return rel
    out_rel = f"{Path(rel).parent.as_posix()}/{o.mask}.png"
    (out_dir / "images" / out_rel).parent.mkdir(parents=True, exist_ok=True)
    seen.save(out_dir / "images" / out_rel)  # a new file per run dir; the run is complete only at the end
    if n_made < o.debug_images:
        _debug(source, mask, seen, out_dir / "debug" / f"{Path(rel).parent.name}.png")
    return out_rel
