"""HAM10000 data: the synthetic release, lesion-grouped splits, safe image loading and `prepare`."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from medlava.data import images as images_mod
from medlava.data.ham10000 import (
    CLASSES,
    COLUMNS,
    IMAGE_DIRS,
    METADATA,
    QUESTION,
    find_images,
    prepare_ham10000,
    read_metadata,
)
from medlava.data.images import load_image, resolve_image
from medlava.data.problems import REASONS
from medlava.data.splits import check_no_group_leak, grouped_split, read_split_file
from medlava.data.synthetic import MARKER, make_synthetic_ham10000
from medlava.io import InputError, read_jsonl
from PIL import Image

LOCALIZATIONS = {
    "back",
    "lower extremity",
    "trunk",
    "upper extremity",
    "abdomen",
    "face",
    "chest",
    "foot",
    "unknown",
    "neck",
    "scalp",
    "hand",
    "ear",
    "genital",
    "acral",
}


@pytest.fixture(scope="module")
def ham(tmp_path_factory) -> Path:
    """A synthetic HAM10000 (150 lesions), built once for the module; tests must not modify it."""
    return make_synthetic_ham10000(tmp_path_factory.mktemp("syn") / "ham", seed=0)


@pytest.fixture(scope="module")
def meta(ham) -> pd.DataFrame:
    return pd.read_csv(ham / METADATA)


@pytest.fixture
def ham_copy(ham, tmp_path) -> Path:
    return Path(shutil.copytree(ham, tmp_path / "ham"))


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


# --- synthetic release ---------------------------------------------------------------------------------------


def test_synthetic_writes_the_real_layout(ham, meta):
    assert list(meta.columns) == ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    assert meta["lesion_id"].str.fullmatch(r"HAM_\d{7}").all() and meta["image_id"].str.fullmatch(r"ISIC_\d{7}").all()
    assert meta["lesion_id"].nunique() == 150 and meta["image_id"].is_unique
    lesions_per_class = meta.groupby("dx")["lesion_id"].nunique()
    assert set(lesions_per_class.index) == set(CLASSES) and lesions_per_class.min() >= 3
    assert lesions_per_class.idxmax() == "nv" and lesions_per_class["nv"] > 0.4 * 150  # skewed like the real one
    assert set(meta["dx_type"]) <= {"histo", "follow_up", "consensus", "confocal"}
    assert set(meta["sex"]) <= {"male", "female", "unknown"} and set(meta["localization"]) <= LOCALIZATIONS
    ages = meta["age"].dropna()
    assert (ages % 5 == 0).all() and 0 < meta["age"].isna().sum() < 0.1 * len(meta)
    per_lesion = meta.groupby("lesion_id").size()
    assert per_lesion.max() == 3 and per_lesion.min() == 1 and per_lesion.mean() > 1.5
    # one lesion, one patient: its images share all metadata
    assert (meta.groupby("lesion_id")[["dx", "age", "sex", "localization"]].nunique(dropna=False) == 1).all().all()
    # images split between the two release folders, lower ids in part 1, one file per row
    files = {d: sorted(p.stem for p in (ham / d).iterdir()) for d in IMAGE_DIRS[:2]}
    assert all(len(f) > 0.4 * len(meta) for f in files.values())
    assert max(files[IMAGE_DIRS[0]]) < min(files[IMAGE_DIRS[1]])
    assert sorted(files[IMAGE_DIRS[0]] + files[IMAGE_DIRS[1]]) == sorted(meta["image_id"])
    with Image.open(ham / IMAGE_DIRS[0] / f"{files[IMAGE_DIRS[0]][0]}.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))
    assert not [p for p in ham.parent.iterdir() if p != ham]  # no temp dir left beside root


def test_synthetic_is_deterministic_and_idempotent(tmp_path, caplog):
    a = make_synthetic_ham10000(tmp_path / "a", n_lesions=20, seed=3)
    b = make_synthetic_ham10000(tmp_path / "b", n_lesions=20, seed=3)
    c = make_synthetic_ham10000(tmp_path / "c", n_lesions=20, seed=4)
    assert _tree_digest(a) == _tree_digest(b) != _tree_digest(c)
    before = {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    assert make_synthetic_ham10000(a, n_lesions=20, seed=3) == a
    assert make_synthetic_ham10000(a, n_lesions=99, seed=3) == a and "reusing it" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*")} == before


def test_synthetic_small_sets_have_every_class(tmp_path):
    meta = pd.read_csv(make_synthetic_ham10000(tmp_path / "s", n_lesions=14, max_images_per_lesion=1) / METADATA)
    assert len(meta) == 14 and meta.groupby("dx")["lesion_id"].nunique().to_dict() == dict.fromkeys(CLASSES, 2)
    with pytest.raises(ValueError, match="n_lesions >= 14"):
        make_synthetic_ham10000(tmp_path / "t", n_lesions=13)


def test_synthetic_refuses_to_overwrite_user_data(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=f"{root} exists and is not a synthetic HAM10000.*refusing"):
        make_synthetic_ham10000(root, n_lesions=14)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (make_synthetic_ham10000(empty, n_lesions=14) / MARKER).is_file()  # an empty dir is fine


def _lesion_colour(path: Path) -> np.ndarray:
    """Mean colour of the pixels that differ from the border (the skin)."""
    a = np.asarray(Image.open(path), dtype=float)
    skin = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).mean(0)
    return a[np.linalg.norm(a - skin, axis=2) > 40].mean(0)


def test_synthetic_classes_are_learnable(ham, meta):
    """Class colours are far apart and a nearest-centroid rule fit on some lesions labels the others."""
    files = find_images(ham)
    df = meta.assign(
        colour=[_lesion_colour(files[i]) for i in meta["image_id"]],
        split=grouped_split(meta, "lesion_id", "dx", (0.5, 0.0, 0.5), seed=0),
    )
    centroids = {dx: np.stack(g["colour"]).mean(0) for dx, g in df[df["split"] == "train"].groupby("dx")}
    assert min(np.linalg.norm(centroids[a] - centroids[b]) for a, b in itertools.combinations(CLASSES, 2)) > 30
    test = df[df["split"] == "test"]
    names, c = list(centroids), np.stack(list(centroids.values()))
    predicted = [names[np.linalg.norm(c - x, axis=1).argmin()] for x in test["colour"]]
    assert np.mean(np.array(predicted) == test["dx"].to_numpy()) > 0.95


# --- splits ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big() -> pd.DataFrame:
    """3000 lesions with HAM10000's class skew and 1-3 images each."""
    rng = np.random.default_rng(1)
    p = np.array([327, 514, 1099, 115, 1113, 6705, 142]) / 10015
    labels = rng.choice(CLASSES, 3000, p=p)
    n = rng.integers(1, 4, 3000)
    return pd.DataFrame({"lesion_id": np.repeat([f"L{i}" for i in range(3000)], n), "dx": np.repeat(labels, n)})


def test_grouped_split_keeps_lesions_whole_and_respects_ratios(big):
    split = grouped_split(big, "lesion_id", "dx", (0.7, 0.15, 0.15), seed=0)
    assert split.index.equals(big.index) and set(split) == {"train", "val", "test"}  # every row exactly one split
    df = big.assign(split=split)
    check_no_group_leak(df, "lesion_id", "split")
    lesions = [set(g["lesion_id"]) for _, g in df.groupby("split")]
    assert not any(a & b for a, b in itertools.combinations(lesions, 2))
    group_share = df.drop_duplicates("lesion_id")["split"].value_counts(normalize=True)
    image_share = split.value_counts(normalize=True)
    for s, r in {"train": 0.7, "val": 0.15, "test": 0.15}.items():
        assert abs(group_share[s] - r) < 0.01 and abs(image_share[s] - r) < 0.02
    # stratified: each class's lesions are shared out by the same ratios
    per_class = pd.crosstab(
        df.drop_duplicates("lesion_id")["dx"], df.drop_duplicates("lesion_id")["split"], normalize="index"
    )
    assert (per_class["train"] - 0.7).abs().max() < 0.05 and (per_class[["val", "test"]] > 0.1).all().all()


def test_grouped_split_is_deterministic_for_a_seed(big):
    a = grouped_split(big, "lesion_id", "dx", (0.7, 0.15, 0.15), seed=0)
    assert a.equals(grouped_split(big, "lesion_id", "dx", (0.7, 0.15, 0.15), seed=0))
    shuffled = big.sample(frac=1, random_state=0)  # row order does not matter
    assert grouped_split(shuffled, "lesion_id", "dx", (0.7, 0.15, 0.15), seed=0).sort_index().equals(a)
    assert not a.equals(grouped_split(big, "lesion_id", "dx", (0.7, 0.15, 0.15), seed=1))


def test_grouped_split_puts_rare_classes_in_every_split():
    df = pd.DataFrame({"g": [f"g{i}" for i in range(43)], "y": ["rare"] * 3 + ["common"] * 40})
    split = grouped_split(df, "g", "y", (0.7, 0.15, 0.15), seed=0)
    assert sorted(split[:3]) == ["test", "train", "val"]
    assert set(grouped_split(df, "g", "y", (0.8, 0.2, 0.0), seed=0)) == {"train", "val"}


@pytest.mark.parametrize("ratios", [(0.5, 0.5, 0.5), (1.1, -0.05, -0.05), (float("nan"), 0.5, 0.5), (0.5, 0.5)])
def test_grouped_split_rejects_bad_ratios(big, ratios):
    with pytest.raises(ValueError, match="split ratios must be three numbers >= 0 that sum to 1"):
        grouped_split(big, "lesion_id", "dx", ratios, seed=0)


def test_check_no_group_leak_names_the_groups():
    df = pd.DataFrame({"lesion_id": ["a", "a", "b", "c", "c"], "split": ["train", "test", "val", "val", "train"]})
    with pytest.raises(
        InputError,
        match=r"2 lesion_id values fall in more than one split: a \(test/train\), "
        r"c \(train/val\)",
    ):
        check_no_group_leak(df, "lesion_id", "split")


def test_read_split_file(tmp_path):
    f = tmp_path / "split.csv"
    f.write_text("image_id,split\nA,train\n\nB,val\nC,test\n")
    assert read_split_file(f, "image_id", ids=["A", "B"]).to_dict() == {"A": "train", "B": "val", "C": "test"}
    with pytest.raises(InputError, match=r"gives no split for 1 images, e.g. \['D'\]"):
        read_split_file(f, "image_id", ids=["A", "D"])
    f.write_text("image_id,split\nA,train\n\nB,holdout\n")
    with pytest.raises(InputError, match=f"{f}:4: image_id='B' split='holdout'"):
        read_split_file(f, "image_id")
    f.write_text("image_id,split\nA,train\nB,val\nA,test\n")
    with pytest.raises(InputError, match=r"image_id 'A' is listed on lines \[2, 4\]"):
        read_split_file(f, "image_id")
    f.write_text("id,fold\nA,train\n")
    with pytest.raises(InputError, match="expected image_id,split"):
        read_split_file(f, "image_id")


# --- images ---------------------------------------------------------------------------------------------------


def test_resolve_image_refuses_paths_that_leave_root(tmp_path):
    root = tmp_path / "root"
    assert resolve_image(root, "a/../b/x.jpg") == root / "b" / "x.jpg"
    assert resolve_image(root, str(root / "x.jpg")) == root / "x.jpg"
    for rel in ("../x.jpg", "a/../../x.jpg", "/etc/passwd", str(tmp_path / "rootx" / "x.jpg"), "."):
        with pytest.raises(InputError, match="is not a file inside the image root"):
            resolve_image(root, rel)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that only claims its size: enough for a decompression-bomb check, which reads the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_load_image_errors_name_path_sample_and_fix(ham, tmp_path):
    good = next((ham / IMAGE_DIRS[0]).iterdir())
    assert load_image(good).size == (64, 64)
    with pytest.raises(InputError, match=rf"{tmp_path}/nope.jpg \(sample s1\) does not exist"):
        load_image(tmp_path / "nope.jpg", sample_id="s1")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[:400])
    with pytest.raises(InputError, match=rf"{truncated} \(sample s2\) cannot be read .*[Tt]runcated.*re-export"):
        load_image(truncated, sample_id="s2")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match=rf"{garbage} \(sample s3\) cannot be read"):
        load_image(garbage, sample_id="s3")
    for w, h in ((9000, 9000), (30000, 30000)):  # over our limit; over Pillow's own hard limit
        bomb = tmp_path / f"bomb{w}.png"
        bomb.write_bytes(_png_header(w, h))
        with pytest.raises(InputError, match=rf"{bomb} \(sample s4\) is over the .*-pixel limit.*downscale"):
            load_image(bomb, sample_id="s4")
    assert 9000 * 9000 > images_mod.MAX_PIXELS


def test_load_image_stretches_16_bit_images(tmp_path):
    path = tmp_path / "x16.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)).save(path)
    a = np.asarray(load_image(path))
    assert a.shape == (64, 64, 3) and a.min() == 0 and a.max() == 255 and (a == 255).mean() < 0.01


# --- prepare --------------------------------------------------------------------------------------------------


def test_prepare_writes_samples_in_the_design_schema(ham, meta, tmp_path):
    out = tmp_path / "out"
    summary = prepare_ham10000(ham, out, seed=0)
    assert json.loads((out / "dataset.json").read_text()) == summary
    assert not list(out.glob(".*"))  # atomic writes left no temp files
    rows = {s: list(read_jsonl(out / f"{s}.jsonl")) for s in ("train", "val", "test")}
    lesions = [{r["meta"]["group"] for r in rs} for rs in rows.values()]
    assert not any(a & b for a, b in itertools.combinations(lesions, 2))  # no lesion in two splits
    all_rows = [r for rs in rows.values() for r in rs]
    assert sorted(r["id"] for r in all_rows) == sorted(meta["image_id"])  # each image in exactly one split
    assert {s: len(rs) for s, rs in rows.items()} == summary["splits"]
    assert abs(len(rows["train"]) / len(meta) - 0.7) < 0.08 and all(len(rs) > 0.08 * len(meta) for rs in rows.values())
    by_id = meta.set_index("image_id")
    for split, rs in rows.items():
        for r in rs:
            m = by_id.loc[r["id"]]
            age = None if pd.isna(m["age"]) else float(m["age"])
            assert r == {
                "id": r["id"],
                "image": r["image"],
                "conversations": [
                    {"from": "human", "value": "<image>\n" + QUESTION},
                    {"from": "gpt", "value": m["dx"]},
                ],
                "meta": {
                    "dataset": "ham10000",
                    "split": split,
                    "task": "closed",
                    "choices": list(CLASSES),
                    "answer": m["dx"],
                    "label": m["dx"],
                    "group": m["lesion_id"],
                    "age": age,
                    "sex": m["sex"],
                    "localization": m["localization"],
                    "dx_type": m["dx_type"],
                },
            }
            assert re.fullmatch(r"HAM10000_images_part_[12]/ISIC_\d{7}\.jpg", r["image"])
            assert (ham / r["image"]).is_file()
    assert QUESTION == "What is the lesion type? Choose one of: akiec, bcc, bkl, df, mel, nv, vasc."
    assert any(r["meta"]["age"] is None for r in all_rows)  # missing ages stay null, not imputed
    assert summary["dataset"] == "ham10000" and summary["image_root"] == str(ham.resolve())
    assert summary["choices"] == list(CLASSES) and summary["skipped"] == dict.fromkeys(REASONS, 0)
    for split, counts in summary["class_counts"].items():
        assert list(counts) == list(CLASSES) and all(n > 0 for n in counts.values())  # every class in every split
        assert counts == {dx: sum(r["meta"]["label"] == dx for r in rows[split]) for dx in CLASSES}
    assert prepare_ham10000(ham, tmp_path / "again", seed=0) == summary  # deterministic
    assert (tmp_path / "again" / "test.jsonl").read_bytes() == (out / "test.jsonl").read_bytes()


def _write_csv(root: Path, df: pd.DataFrame) -> Path:
    root.mkdir(exist_ok=True)
    df.to_csv(root / METADATA, index=False)
    return root / METADATA


def test_prepare_rejects_bad_metadata(meta, tmp_path):
    csv = _write_csv(tmp_path / "a", meta.drop(columns=["localization"]))
    with pytest.raises(
        InputError,
        match=rf"{csv}: missing columns \['localization'\]; expected "
        r"lesion_id,image_id,dx,dx_type,age,sex,localization",
    ):
        prepare_ham10000(tmp_path / "a", tmp_path / "out")
    bad = meta.copy()
    bad.loc[7, "dx"] = "melanoma"
    csv = _write_csv(tmp_path / "b", bad)
    with pytest.raises(InputError, match=rf"{csv}:9: unknown dx 'melanoma' for {bad.loc[7, 'image_id']}"):
        prepare_ham10000(tmp_path / "b", tmp_path / "out")
    dup = pd.concat([meta, meta.iloc[[4]]], ignore_index=True)
    csv = _write_csv(tmp_path / "c", dup)
    dup_id = meta.loc[4, "image_id"]
    with pytest.raises(InputError, match=rf"image_id '{dup_id}' is listed on lines \[6, {len(meta) + 2}\]"):
        prepare_ham10000(tmp_path / "c", tmp_path / "out")
    with pytest.raises(InputError, match=rf"{tmp_path}/d/{METADATA} not found"):
        prepare_ham10000(tmp_path / "d", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_metadata_counts_lines_across_blank_lines_and_keeps_missing_values(tmp_path):
    csv = tmp_path / METADATA
    csv.write_text(f"{','.join(COLUMNS)}\nHAM_1,ISIC_1,nv,histo,,,\n\nHAM_2,ISIC_2,nv,histo,forty,male,back\n")
    with pytest.raises(InputError, match=f"{csv}:4: age 'forty' of ISIC_2 is not a number"):
        read_metadata(csv)
    csv.write_text(f"{','.join(COLUMNS)}\nHAM_1,ISIC_1,nv,histo,,,\n")
    row = read_metadata(csv).iloc[0]
    assert pd.isna(row["age"]) and pd.isna(row["sex"]) and pd.isna(row["localization"])


def test_prepare_missing_image_is_an_error_or_a_counted_skip(ham_copy, meta, tmp_path):
    gone = meta["image_id"].iloc[10]
    next(ham_copy.glob(f"HAM10000_images_part_*/{gone}.jpg")).unlink()
    with pytest.raises(InputError, match=rf"{METADATA}:12: image {gone} not found.*skip_missing_images=true"):
        prepare_ham10000(ham_copy, tmp_path / "out")
    summary = prepare_ham10000(ham_copy, tmp_path / "out", skip_missing=True)
    assert summary["skipped"] == {**dict.fromkeys(REASONS, 0), "missing_image": 1}
    assert sum(summary["splits"].values()) == len(meta) - 1
    ids = {r["id"] for s in ("train", "val", "test") for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")}
    assert gone not in ids and len(ids) == len(meta) - 1


def test_prepare_reads_a_single_images_folder(ham_copy, meta, tmp_path):
    (ham_copy / "images").mkdir()
    for d in IMAGE_DIRS[:2]:
        for p in (ham_copy / d).iterdir():
            p.rename(ham_copy / "images" / p.name)
        (ham_copy / d).rmdir()
    prepare_ham10000(ham_copy, tmp_path / "out")
    rows = list(read_jsonl(tmp_path / "out" / "train.jsonl"))
    assert rows and all(r["image"].startswith("images/ISIC_") for r in rows)
    shutil.copy(ham_copy / "images" / f"{meta['image_id'][0]}.jpg", ham_copy / "images" / f"{meta['image_id'][0]}.png")
    with pytest.raises(InputError, match=rf"image {meta['image_id'][0]} is both .* keep one"):
        prepare_ham10000(ham_copy, tmp_path / "out")


def test_prepare_uses_a_split_file_and_checks_it(ham, meta, tmp_path):
    lesion_split = {lesion: ("train", "val", "test")[i % 3] for i, lesion in enumerate(meta["lesion_id"].unique())}
    f = tmp_path / "split.csv"
    meta.assign(split=meta["lesion_id"].map(lesion_split))[["image_id", "split"]].to_csv(f, index=False)
    summary = prepare_ham10000(ham, tmp_path / "out", split_file=f)
    assert summary["split"] == {"file": str(f)}
    for s in ("train", "val", "test"):
        assert {r["id"] for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")} == set(
            meta.loc[meta["lesion_id"].map(lesion_split) == s, "image_id"]
        )
    # the two images of one lesion put in different splits: the leak is refused
    lesion = meta["lesion_id"][meta["lesion_id"].duplicated()].iloc[0]
    leaky = meta.assign(split=meta["lesion_id"].map(lesion_split))
    first = leaky.index[leaky["lesion_id"] == lesion][0]
    leaky.loc[first, "split"] = "test" if leaky.loc[first, "split"] != "test" else "train"
    leaky[["image_id", "split"]].to_csv(f, index=False)
    with pytest.raises(InputError, match=f"1 lesion_id values fall in more than one split: {lesion}"):
        prepare_ham10000(ham, tmp_path / "out2", split_file=f)
    leaky.iloc[1:][["image_id", "split"]].to_csv(f, index=False)
    with pytest.raises(InputError, match=rf"gives no split for 1 images, e.g. \['{meta['image_id'][0]}'\]"):
        prepare_ham10000(ham, tmp_path / "out2", split_file=f)
