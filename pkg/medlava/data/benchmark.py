"""What the medical VQA benchmark adapters share (SLAKE, VQA-RAD, PathVQA, PMC-VQA, OmniMedVQA, MedXpertQA, MMMU):
the sample a question becomes (open; closed with its evident choices; multiple choice with lettered options), the
parquet files of the Hugging Face copies and the images stored inside them, and several images made into one for a
single-image model."""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

from PIL import Image

from medlava.data.images import BadImage, load_image
from medlava.data.prepare import Loaded
from medlava.data.problems import Problems, clean_strings
from medlava.io import InputError

IMAGE = "<image>"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's multiple-choice instruction (its MMBench / ScienceQA prompts; MMMU's LLaVA config uses it too)."""
HF_COLUMNS = ("image", "question", "answer")
_EITHER = re.compile(r",\s*([^,?]+?)\s+or\s+([^,?]+?)\s*\?\s*$", re.IGNORECASE)


LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def option_letters(n: int) -> list[str]:
    if not 2 <= n <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(LETTERS)} options, got {n}")
    return list(LETTERS[:n])


def closed_choices(question: str, answer: str) -> tuple[list[str], str] | None:
    """(choices, answer) where the question makes them evident: yes/no, or '..., A or B?' answered by A or B."""
    a = answer.strip()
    if a.lower() in ("yes", "no"):
        return ["yes", "no"], a.lower()
    m = _EITHER.search(question)
    if m:
        options = [m.group(1).strip(), m.group(2).strip()]
        hit = [o for o in options if o.lower() == a.lower()]
        if hit:
            return options, hit[0]
    return None


def _turns(prompt: str, answer: str, image: str | None) -> list[dict]:
    return [{"from": "human", "value": (f"{IMAGE}\n" if image else "") + prompt}, {"from": "gpt", "value": answer}]


def vqa_sample(
    sid: str, image: str | None, question: str, answer: str, task: str, meta: dict, instruction: str = ""
) -> dict:
    """An open or closed question; a closed one gets meta.choices when the question makes them evident (infer then
    answers it by option likelihood), else it is generated and scored as text."""
    question, answer = question.strip(), answer.strip()
    meta = {**meta, "task": task, "answer": answer}
    if task == "closed" and (evident := closed_choices(question, answer)):
        meta["choices"], answer = evident
        meta["answer"] = answer
    prompt = question + (f" {instruction}" if instruction else "")
    return {"id": sid, "image": image, "conversations": _turns(prompt, answer, image), "meta": meta}


def mc_prompt(question: str, options: Mapping[str, str], instruction: str = MC_INSTRUCTION) -> str:
    """LLaVA-1.5's multiple-choice layout: the question, one `L. option` line per option, the instruction."""
    return "\n".join([question.strip(), *(f"{k}. {v}" for k, v in options.items()), instruction])


def mc_sample(sid: str, image: str | None, prompt: str, options: Mapping[str, str], answer: str, meta: dict) -> dict:
    """A multiple-choice question: the choices are the option letters, the answer a letter (what the model is
    trained to say and what infer scores by likelihood); the option texts stay in meta.options."""
    meta = {
        **meta,
        "task": "multiple_choice",
        "choices": list(options),
        "options": dict(options),
        "answer": answer,
        "answer_text": options[answer],
    }
    return {"id": sid, "image": image, "conversations": _turns(prompt, answer, image), "meta": meta}


def parquet_files(root: Path, split: str) -> list[Path]:
    """The parquet shards of one split as the Hugging Face hub stores them: `data/{split}-*.parquet` (or the same
    beside `root`)."""
    return sorted({*Path(root).glob(f"data/{split}-*.parquet"), *Path(root).glob(f"{split}-*.parquet")})


def parquet_records(path: Path, problems: Problems, columns: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """(`path row N`, record) of a parquet file, a batch at a time (the images inside make files large);
    InputError when it is no parquet file or lacks `columns`."""
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"{path} cannot be read as parquet ({e})") from None
    missing = [c for c in columns if c not in f.schema_arrow.names]
    if missing:
        raise InputError(
            f"{path}: missing columns {missing}; expected {', '.join(columns)} (found {f.schema_arrow.names})"
        )
    n = 0
    for batch in f.iter_batches(batch_size=64):
        for rec in batch.to_pylist():
            where = f"{path} row {n}"
            n += 1
            bad = clean_strings({k: v for k, v in rec.items() if isinstance(v, str)})
            if bad:
                problems.add("non_utf8", where, f"text is not UTF-8 ({bad})")
                continue
            yield where, rec


class ImageStore:
    """Images written into the prepare run (`out_dir/images`): parquet-embedded bytes under their content hash
    (one file however many questions share the image), and several images combined into one."""

    def __init__(self, out_dir: Path):
        self.root = Path(out_dir) / "images"

    def embedded(self, cell: dict | None, where: str) -> str:
        """The relative path of a parquet image cell ({bytes, path}), written once; BadImage when there is none."""
        data = (cell or {}).get("bytes")
        if not data:
            raise BadImage("missing_image", f"{where}: the row holds no image bytes")
        digest = hashlib.sha1(data).hexdigest()
        suffix = Path(str((cell or {}).get("path") or "")).suffix.lower() or self._suffix(data)
        rel = f"{digest[:2]}/{digest}{suffix}"
        path = self.root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return rel

    @staticmethod
    def _suffix(data: bytes) -> str:
        try:
            with Image.open(io.BytesIO(data)) as im:
                return "." + (im.format or "img").lower().replace("jpeg", "jpg")
        except (OSError, SyntaxError, ValueError):
            return ".img"  # the image check reports it as unreadable, with the sample

    def combined(self, images: list[Image.Image], name: str) -> str:
        """Several images side by side, left to right in their order, as one PNG (`combined/<name>.png`)."""
        rel = f"combined/{name}.png"
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        side_by_side(images).save(tmp, format="PNG")
        os.replace(tmp, path)
        return rel

    def linked(self, source: Path) -> str:
        """A file of the release made visible under the run's image root by a symlink (`linked/<name>`)."""
        rel = f"linked/{source.name}"
        path = self.root / rel
        if not path.is_symlink():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(source.absolute())
        return rel


def hf_vqa(
    dataset: str, root: Path, out_dir: Path, problems: Problems, splits: dict[str, str], instruction: str
) -> Loaded:
    """A flaviagiammarino-style parquet copy (image, question, answer): `splits` maps medlava's split names to the
    file prefixes; ids are `<split>-<row>`, images written out by content."""
    store = ImageStore(out_dir)
    loaded = Loaded(dataset, store.root)
    stats: Counter[str] = Counter()
    for split, prefix in splits.items():
        files = parquet_files(root, prefix)
        if not files:
            problems.fatal(
                InputError(
                    f"{root}: no data/{prefix}-*.parquet (a local copy of the Hugging Face "
                    f"dataset, e.g. `hf download --repo-type dataset ... --local-dir {root}`)"
                )
            )
            continue
        n = 0
        for path in files:
            for where, rec in parquet_records(path, problems, HF_COLUMNS):
                sid = f"{split}-{n}"
                n += 1
                if not str(rec.get("question") or "").strip() or rec.get("answer") is None:
                    problems.add("bad_record", where, "no question or answer")
                    continue
                try:
                    image = store.embedded(rec["image"], where)
                except BadImage as e:
                    problems.add(e.reason, where, str(e))
                    continue
                task = "closed" if str(rec["answer"]).strip().lower() in ("yes", "no") else "open"
                stats[f"{split}_{task}"] += 1
                meta = {"dataset": dataset, "split": split, "answer_type": task.upper(), "row": n - 1}
                loaded.add(
                    vqa_sample(sid, image, str(rec["question"]), str(rec["answer"]), task, meta, instruction), where
                )
    loaded.summary = {
        "source": "hf",
        "split": {"official": True, "files": splits},
        "closed": "yes/no answers",
        "stats": dict(stats),
    }
    return loaded


def side_by_side(images: list[Image.Image]) -> Image.Image:
    """Images scaled to the tallest one's height and placed left to right with a 8-pixel black gap. Hand-written:
    a few lines, the layout VLMEvalKit uses to give single-image models multi-image questions."""
    height = max(im.height for im in images)
    scaled = [im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    gap = 8
    out = Image.new("RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), height))
    x = 0
    for im in scaled:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def combine_files(store: ImageStore, files: list[Path], name: str, sample_id: str) -> str:
    """One image for a question with several image files: the only one linked, or all side by side."""
    if len(files) == 1:
        return store.linked(files[0])  # checked with every other image, after reading
    return store.combined([load_image(f, sample_id) for f in files], name)
