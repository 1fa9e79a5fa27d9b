"""CNN baselines: a timm backbone, an optional patient-metadata branch (seed 004) and the classifier head; the
metadata encoding fitted on the training split; checkpoints that hold everything prediction needs (weights,
label map, vocabularies, age statistics, image size and normalisation), so the training data is never read again.

A checkpoint directory holds `model.safetensors`, `cnn.json` (the spec) and `medlava.json` (kind "cnn").
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.transforms import v2

from medlava.artifacts import atomic_dir, write_manifest
from medlava.data.images import load_image, resolve_image
from medlava.io import InputError, atomic_write_json

WEIGHTS = "model.safetensors"
SPEC = "cnn.json"
UNKNOWN = "unknown"
BACKBONE = "backbone."


def _text(value: Any) -> str | None:
    """A categorical field as the vocabulary spells it (HAM10000's are lower case); missing -> None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().lower()
    return text or None


def _age(value: Any) -> float | None:
    if value is None or value == "":
        return None
    age = float(value)
    return None if math.isnan(age) else age


@dataclass(frozen=True)
class MetaEncoder:
    """Patient metadata -> model inputs with the training split's statistics, as seed 004 does: age normalised
    by the training mean and std, a missing age replaced by the training median; sex and localization as
    vocabulary indices, index 0 being "unknown" (missing, or a value the training split never had)."""

    sexes: tuple[str, ...]
    localizations: tuple[str, ...]
    age_mean: float
    age_std: float
    age_median: float

    @classmethod
    def fit(cls, metas: Sequence[dict]) -> MetaEncoder:
        ages = np.array([a for m in metas if (a := _age(m.get("age"))) is not None], dtype=float)
        if ages.size == 0:
            raise InputError("cnn.metadata=true but no training sample has an age; set cnn.metadata=false")

        def vocab(key: str) -> tuple[str, ...]:
            return (UNKNOWN, *sorted({t for m in metas if (t := _text(m.get(key))) not in (None, UNKNOWN)}))

        return cls(
            sexes=vocab("sex"),
            localizations=vocab("localization"),
            age_mean=float(ages.mean()),
            age_std=float(ages.std()) or 1.0,
            age_median=float(np.median(ages)),
        )

    def encode(self, meta: dict) -> tuple[float, int, int]:
        age = _age(meta.get("age"))
        sex, loc = _text(meta.get("sex")), _text(meta.get("localization"))
        return (
            ((self.age_median if age is None else age) - self.age_mean) / self.age_std,
            self.sexes.index(sex) if sex in self.sexes else 0,
            self.localizations.index(loc) if loc in self.localizations else 0,
        )

    def missing(self, metas: Sequence[dict]) -> dict[str, tuple[int, str]]:
        """Per field, how many of `metas` lack it and the training default that stands in for it."""
        defaults = {
            "age": (lambda m: _age(m.get("age")) is None, f"the training median age {self.age_median:g}"),
            **{key: (lambda m, key=key: _text(m.get(key)) is None, f"'{UNKNOWN}'") for key in ("sex", "localization")},
        }
        counts = {key: (sum(map(absent, metas)), default) for key, (absent, default) in defaults.items()}
        return {key: c for key, c in counts.items() if c[0]}

    def unseen(self, metas: Sequence[dict]) -> dict[str, list[str]]:
        """Values given but not in the vocabularies (they are encoded as "unknown"), per field."""
        out: dict[str, list[str]] = {}
        for key, vocab in (("sex", self.sexes), ("localization", self.localizations)):
            values = sorted({t for m in metas if (t := _text(m.get(key))) is not None and t not in vocab})
            if values:
                out[key] = values
        return out


@dataclass(frozen=True)
class CnnSpec:
    """What builds the network and prepares its inputs; saved as cnn.json beside the weights."""

    arch: str
    classes: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head_hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    meta: MetaEncoder | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CnnSpec:
        meta = data.get("meta")
        return cls(
            **{
                **data,
                "classes": tuple(data["classes"]),
                "mean": tuple(data["mean"]),
                "std": tuple(data["std"]),
                "head_hidden": tuple(data.get("head_hidden", ())),
                "meta": MetaEncoder(
                    **{**meta, "sexes": tuple(meta["sexes"]), "localizations": tuple(meta["localizations"])}
                )
                if meta
                else None,
            }
        )


class CnnClassifier(nn.Module):
    """backbone(image) [+ metadata branch] -> head. The metadata branch is seed 004's: age through a
    32-64 MLP, sex and localization embedded (8 and 16 wide), together through a 128-wide layer."""

    def __init__(self, spec: CnnSpec, pretrained: str | None = None):
        super().__init__()
        if not timm.is_model(spec.arch):
            raise InputError(
                f"cnn.arch={spec.arch!r} is not a timm model; e.g. resnet18, tf_efficientnetv2_s "
                "(python -c 'import timm; print(timm.list_models())')"
            )
        overlay = {"file": str(pretrained)} if pretrained else None
        self.backbone = timm.create_model(
            spec.arch, pretrained=bool(pretrained), num_classes=0, pretrained_cfg_overlay=overlay
        )
        width = self.backbone.num_features
        self.meta = None
        if spec.meta is not None:
            self.meta = nn.ModuleDict(
                {
                    "age": nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU()),
                    "sex": nn.Embedding(len(spec.meta.sexes), 8),
                    "localization": nn.Embedding(len(spec.meta.localizations), 16),
                    "joint": nn.Sequential(nn.Linear(64 + 8 + 16, 128), nn.ReLU()),
                }
            )
            width += 128
        layers: list[nn.Module] = []
        for hidden in spec.head_hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(spec.dropout)]
            width = hidden
        self.head = nn.Sequential(nn.Dropout(spec.dropout), *layers, nn.Linear(width, len(spec.classes)))

    def forward(
        self, image: torch.Tensor, age: torch.Tensor, sex: torch.Tensor, localization: torch.Tensor
    ) -> torch.Tensor:
        x = self.backbone(image)
        if self.meta is not None:
            m = self.meta
            side = torch.cat([m["age"](age[:, None].to(x.dtype)), m["sex"](sex), m["localization"](localization)], 1)
            x = torch.cat([x, m["joint"](side)], 1)
        return self.head(x)


def new_spec(
    arch: str,
    classes: Sequence[str],
    image_size: int,
    head_hidden: Sequence[int],
    dropout: float,
    meta: MetaEncoder | None,
) -> CnnSpec:
    """A spec whose normalisation is the one timm records for the architecture's weights."""
    cfg = timm.get_pretrained_cfg(arch)
    mean, std = (
        (cfg.mean, cfg.std) if cfg is not None else (timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
    )
    return CnnSpec(
        arch=arch,
        classes=tuple(classes),
        image_size=image_size,
        mean=tuple(mean),
        std=tuple(std),
        head_hidden=tuple(head_hidden),
        dropout=dropout,
        meta=meta,
    )


# -- two-phase training: what trains when ---------------------------------------------------------------------


def backbone_groups(model: CnnClassifier) -> list[list[str]]:
    """The backbone's parameter names in timm's layer groups (stem first, the last block last), the unit
    `unfreeze_fraction` counts in."""
    from timm.models import group_parameters

    if not hasattr(model.backbone, "group_matcher"):
        raise InputError(
            f"timm model {type(model.backbone).__name__} has no layer groups (group_matcher); "
            "use cnn.unfreeze_fraction=1"
        )
    groups = group_parameters(model.backbone, model.backbone.group_matcher(coarse=False))
    return [list(names) for _, names in sorted(groups.items())]


def set_phase(model: CnnClassifier, frozen: bool, unfreeze_fraction: float) -> dict[str, Any]:
    """Phase 1 (`frozen`): the backbone is frozen, head and metadata branch train. Phase 2: the last
    ceil(fraction x groups) backbone groups train too. Returns what trains, for the run's record."""
    groups = backbone_groups(model)
    k = 0 if frozen else math.ceil(unfreeze_fraction * len(groups))
    open_names = {BACKBONE + n for g in groups[len(groups) - k :] for n in g}
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(BACKBONE) or name in open_names
    counts = {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return {
        "backbone_groups": len(groups),
        "trainable_groups": k,
        "first_trainable_group": groups[len(groups) - k][0] if k else None,
        "parameters": counts,
    }


def keep_frozen_statistics(model: nn.Module) -> None:
    """Batch norms whose weights are frozen also keep their running statistics (eval mode), as Keras does for
    frozen layers: otherwise "frozen" layers still drift with every training batch. Call after model.train()."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


# -- inputs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One image to classify: `rel` is inside `root` (checked on load); label -1 when unknown."""

    id: str
    root: Path
    rel: str
    meta: dict
    label: int = -1

    @property
    def path(self) -> Path:
        return resolve_image(self.root, self.rel)


def eval_transform(spec: CnnSpec) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((spec.image_size, spec.image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(spec.mean, spec.std),
        ]
    )


class ItemDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Item], transform: v2.Transform, meta: MetaEncoder | None):
        self.items, self.transform, self.meta = list(items), transform, meta

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        it = self.items[i]
        age, sex, loc = self.meta.encode(it.meta) if self.meta is not None else (0.0, 0, 0)
        return {
            "image": self.transform(load_image(it.path, it.id)),
            "age": torch.tensor(age, dtype=torch.float32),
            "sex": torch.tensor(sex),
            "localization": torch.tensor(loc),
            "label": torch.tensor(it.label),
        }


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    out = {k: batch[k].to(device, non_blocking=True) for k in ("image", "age", "sex", "localization")}
    if device.type == "cuda":
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


@torch.no_grad()
def predict_proba(
    model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, amp_dtype: torch.dtype | None = None
) -> np.ndarray:
    """Class probabilities (n, classes) in the loader's order."""
    model.eval()
    out = []
    for batch in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(**model_inputs(batch, device))
        out.append(torch.softmax(logits.float(), 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


# -- checkpoints ----------------------------------------------------------------------------------------------


def write_cnn(folder: Path, model: CnnClassifier, spec: CnnSpec) -> None:
    """The weights and the spec (what prediction needs besides the manifest) into `folder`."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(Path(folder) / WEIGHTS))
    atomic_write_json(Path(folder) / SPEC, spec.to_json())


def save_cnn(path: Path, model: CnnClassifier, spec: CnnSpec, manifest: dict) -> Path:
    """A standalone checkpoint directory, written atomically (medlava.artifacts); an existing one is replaced."""
    with atomic_dir(Path(path), exists="replace") as tmp:
        write_cnn(tmp, model, spec)
        write_manifest(tmp, "cnn", arch=spec.arch, **manifest)
    return Path(path)


def is_cnn_checkpoint(path: Path) -> bool:
    return (Path(path) / SPEC).is_file()


def load_cnn(path: Path) -> tuple[CnnClassifier, CnnSpec]:
    """The model (eval mode, CPU) and its spec from a checkpoint directory alone."""
    path = Path(path)
    if not is_cnn_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a CNN checkpoint (no {SPEC}); pass checkpoints/best of a cnn run or the run directory"
        )
    spec = CnnSpec.from_json(json.loads((path / SPEC).read_text()))
    model = CnnClassifier(spec)
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    return model.eval(), spec
