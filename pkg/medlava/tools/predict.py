"""`medlava predict`: class probabilities for a folder or a CSV of images (+ patient metadata), from a CNN
checkpoint or a VLM checkpoint (the closed question scored by option likelihood, as `infer` does), written as
predictions.csv in the contract `eval` reads.

    medlava predict --checkpoint runs/tiny/cnn/RUN --images photos/ --out predictions.csv
    medlava predict --checkpoint runs/tiny/sft/RUN --images cases.csv --out predictions.csv

A CSV names each image by `image` (a path inside --image-root, default the CSV's folder) or by `image_id`
(HAM10000_metadata.csv as released: <image-root>[/HAM10000_images_part_1|2]/<image_id>.jpg); optional columns
`id`, `age`, `sex`, `localization` (used by metadata CNNs; missing values as in training: median age,
"unknown"), and `label` or `dx`, the reference, so the output can be scored with `medlava eval`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medlava.data.ham10000 import CLASSES, IMAGE_DIRS, QUESTION
from medlava.io import InputError
from medlava.models.cnn import (
    Item,
    ItemDataset,
    eval_transform,
    is_cnn_checkpoint,
    load_cnn,
    predict_proba,
)
from medlava.predictions import predictions_frame, write_predictions

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
META_COLUMNS = ("age", "sex", "localization")


class CnnPredictor:
    kind = "cnn"

    def __init__(self, checkpoint: Path, device: torch.device):
        self.model, self.spec = load_cnn(checkpoint)
        self.model.to(device)
        self.checkpoint, self.device = Path(checkpoint), device
        self.classes = list(self.spec.classes)
        self.meta = self.spec.meta
        self.title = f"{self.spec.arch}" + (" + patient metadata" if self.meta else "")

    def probabilities(self, items: Sequence[Item], batch_size: int = 32) -> np.ndarray:
        if self.meta is not None:
            known = {"sex": self.meta.sexes, "localization": self.meta.localizations}
            for key, values in self.meta.unseen([it.meta for it in items]).items():
                log.warning(
                    "%s value(s) %s were not in the training data; encoded as 'unknown' (known: %s)",
                    key,
                    values,
                    ", ".join(known[key]),
                )
            if missing := self.meta.missing([it.meta for it in items]):
                log.warning(
                    "filled with training defaults (the model uses patient metadata): "
                    + "; ".join(
                        f"{key} missing for {n} of {len(items)} image(s): {default}"
                        for key, (n, default) in missing.items()
                    )
                )
        loader = torch.utils.data.DataLoader(
            ItemDataset(items, eval_transform(self.spec), self.meta), batch_size=batch_size
        )
        return predict_proba(self.model, loader, self.device)


class VlmPredictor:
    """A LLaVA checkpoint of align/sft answering one closed question: the option log-likelihoods of `choices`,
    softmaxed (as the infer stage scores them); and free-text answers."""

    kind = "vlm"
    meta = None

    def __init__(
        self,
        checkpoint: Path,
        device: torch.device,
        question: str = QUESTION,
        choices: Sequence[str] = CLASSES,
        max_new_tokens: int = 64,
    ):
        from medlava.artifacts import read_manifest
        from medlava.models.llava import load_for_inference, num_image_tokens
        from medlava.precision import choose_dtype

        manifest = read_manifest(checkpoint)
        model_cfg = _model_config(Path(checkpoint), manifest)
        self.model, self.processor, _ = load_for_inference(model_cfg, Path(checkpoint), choose_dtype("auto"))
        self.model.to(device)
        self.checkpoint, self.device = Path(checkpoint), device
        self.template, self.max_length = model_cfg.template, model_cfg.model_max_length
        self.n_image_tokens = num_image_tokens(self.model)
        self.question, self.classes, self.max_new_tokens = question, list(choices), max_new_tokens
        self.title = f"LLaVA ({manifest['kind']} checkpoint, {self.template} template)"

    def _encoder(self, root: Path):
        from medlava.models.inputs import Encoder

        return Encoder(self.processor, self.template, self.n_image_tokens, self.max_length, root)

    def _prompt(self, item: Item, question: str) -> dict:
        turns = [{"from": "human", "value": "<image>\n" + question}]
        return self._encoder(item.root).prompt_item({"id": item.id, "image": item.rel, "conversations": turns})

    def probabilities(self, items: Sequence[Item], batch_size: int = 8) -> np.ndarray:
        from medlava.infer.score import score_choices

        tok = self.processor.tokenizer
        question = {
            "id": "options",
            "image": "options",  # only tokenized: the options follow any image alike
            "conversations": [{"from": "human", "value": "<image>\n" + self.question}],
        }
        options = [self._encoder(Path(".")).answer_ids(question, c) for c in self.classes]
        out = []
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            logps = score_choices(
                self.model,
                [self._prompt(it, self.question) for it in batch],
                [options] * len(batch),
                tok.pad_token_id,
                self.device,
            )
            out += [torch.softmax(torch.tensor(lp), 0).numpy() for lp in logps]
        return np.array(out)

    def answer(self, item: Item, question: str) -> str:
        from medlava.infer.score import generate

        return generate(
            self.model,
            [self._prompt(item, question)],
            self.processor.tokenizer,
            self.device,
            self.max_new_tokens,
            1,
            0.0,
        )[0]


def _model_config(checkpoint: Path, manifest: dict):
    """The model section of the run that wrote the checkpoint (template, attention, aspect, max length), as
    `infer` with that config would use it; without the run's config, the manifest's base model and template."""
    from medlava.config import ConfigError, ModelConfig, load_config

    run_config = checkpoint.parent.parent / "config.yaml"
    if run_config.exists():
        try:
            model = load_config(run_config).model
            if model is not None:  # a VLM checkpoint's run always has one; a hand-edited config may not
                return model
        except ConfigError as e:
            log.warning("%s does not load (%s); using the checkpoint's manifest only", run_config, e)
    return ModelConfig(name_or_path=manifest["base_model"], template=manifest["template"])


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def load_predictor(
    path: Path, device: torch.device, question: str = QUESTION, choices: Sequence[str] = CLASSES
) -> CnnPredictor | VlmPredictor:
    """A CNN or VLM predictor from a checkpoint directory or a complete cnn/align/sft run directory."""
    from medlava.artifacts import checkpoint_of

    ckpt = checkpoint_of(Path(path))
    if is_cnn_checkpoint(ckpt):
        return CnnPredictor(ckpt, device)
    return VlmPredictor(ckpt, device, question, choices)


def add_predictor_args(p: argparse.ArgumentParser) -> None:
    """The options `medlava predict` and `medlava serve` share: which model, where it runs, what it is asked."""
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a checkpoint directory, or a complete cnn / sft / align run directory",
    )
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--question", default=QUESTION, help="VLM: the closed question whose options are scored")
    p.add_argument("--choices", default=",".join(CLASSES), help="VLM: comma-separated answer options (the classes)")


def predictor_from_args(args: argparse.Namespace) -> CnnPredictor | VlmPredictor:
    return load_predictor(
        args.checkpoint,
        choose_device(args.device),
        args.question,
        [c.strip() for c in args.choices.split(",") if c.strip()],
    )


# -- inputs ---------------------------------------------------------------------------------------------------


def _unique_ids(items: list[Item], where: Path) -> list[Item]:
    dupes = [i for i, n in Counter(it.id for it in items).items() if n > 1]
    if dupes:
        raise InputError(
            f"{where}: id(s) {dupes[:5]} name more than one image; ids must be unique (give an `id` "
            "column, or rename the files)"
        )
    return items


def read_folder(folder: Path) -> list[Item]:
    """Every image under `folder` (by suffix, recursively), id = its path without the suffix."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if len(images) < len(files):
        log.info(
            "%s: ignoring %d file(s) without an image suffix (%s)",
            folder,
            len(files) - len(images),
            ", ".join(IMAGE_SUFFIXES),
        )
    if not images:
        raise InputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    rels = [p.relative_to(folder) for p in images]
    return _unique_ids([Item(r.with_suffix("").as_posix(), folder, r.as_posix(), {}) for r in rels], folder)


def _find_image(root: Path, image_id: str) -> str | None:
    for folder in ("", *IMAGE_DIRS):
        for suffix in IMAGE_SUFFIXES:
            rel = Path(folder) / f"{image_id}{suffix}"
            if (root / rel).is_file():
                return rel.as_posix()
    return None


def read_csv(csv: Path, image_root: Path | None, classes: Sequence[str]) -> list[Item]:
    root = Path(image_root) if image_root else csv.parent
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as e:
        raise InputError(f"{csv} cannot be read as CSV ({e})") from None
    if "image" not in df.columns and "image_id" not in df.columns:
        raise InputError(f"{csv}: needs an `image` column (path inside {root}) or `image_id`; has {list(df.columns)}")
    label_col = next((c for c in ("label", "dx") if c in df.columns), None)
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for line, row in enumerate(df.to_dict("records"), 2):
        where = f"{csv}:{line}"
        if isinstance(row.get("image"), str):
            rel = row["image"]
        elif isinstance(row.get("image_id"), str):
            rel = _find_image(root, row["image_id"])
            if rel is None:
                raise InputError(
                    f"{where}: image {row['image_id']} not found under {root} (or its "
                    f"{'/'.join(IMAGE_DIRS)} folders) as {'/'.join(IMAGE_SUFFIXES)}; check --image-root"
                )
        else:
            raise InputError(f"{where}: no image given; fill `image` or `image_id`")
        meta = {k: row[k] for k in META_COLUMNS if k in row and isinstance(row[k], str)}
        if "age" in meta:
            try:
                meta["age"] = float(meta["age"])
            except ValueError:
                raise InputError(
                    f"{where}: age {meta['age']!r} is not a number; write a number or leave it empty"
                ) from None
        label = -1
        if label_col and isinstance(row.get(label_col), str):
            if row[label_col] not in index:
                raise InputError(
                    f"{where}: {label_col} {row[label_col]!r} is not one of the model's classes {list(classes)}"
                )
            label = index[row[label_col]]
        item_id = next(
            (row[k] for k in ("id", "image_id") if isinstance(row.get(k), str)), Path(rel).with_suffix("").as_posix()
        )
        items.append(Item(item_id, root, rel, meta, label))
    if not items:
        raise InputError(f"{csv} lists no images")
    return _unique_ids(items, csv)


def read_inputs(path: Path, image_root: Path | None, classes: Sequence[str]) -> list[Item]:
    path = Path(path)
    if path.is_dir():
        return read_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a folder of images or a CSV listing them")
    return read_csv(path, image_root, classes)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="medlava predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_predictor_args(p)
    p.add_argument("--images", required=True, type=Path, help="a folder of images, or a CSV listing them")
    p.add_argument("--image-root", type=Path, help="where a CSV's image paths start (default: the CSV's folder)")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="predictions CSV to write")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        predictor = predictor_from_args(args)
        items = read_inputs(args.images, args.image_root, predictor.classes)
        frame = predictions_frame(items, predictor.probabilities(items, args.batch_size), predictor.classes)
        write_predictions(args.out, frame)
    except (InputError, FileNotFoundError) as e:
        print(f"medlava predict: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{c} {n}" for c, n in frame["prediction"].value_counts().items())
    print(f"{len(frame)} image(s), {predictor.kind} {predictor.checkpoint}: {counts} -> {args.out}")
    return 0
