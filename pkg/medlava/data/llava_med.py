"""LLaVA-Med's own data read as released: llava_med_alignment_500k.json / llava_med_instruct_*.json (JSON
arrays of {id, image, conversations} — `conversatons`, a misspelling in some releases, is read too) and
llava_med_eval_qa50_qa.jsonl (question_id, image, text, gpt4_answer, ...) as the test split. Images are
`{pair_id}.jpg` under data.image_root (default data.root/images); splits are grouped by PMC article (the part of
the pair id before its first '_'), so no article's figures are in two splits."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from medlava.config import Config
from medlava.data.prepare import Loaded
from medlava.data.problems import Problems, read_json_records, read_jsonl_records
from medlava.data.splits import grouped_split

log = logging.getLogger(__name__)

IMAGE = "<image>"


def article(pair_id: str) -> str:
    return str(pair_id).split("_", 1)[0]


def conversation(rec: dict) -> tuple[list[dict] | None, str]:
    """The record's turns, checked (human/gpt alternating, non-empty text, one <image> in the first human turn
    when there is an image: added in front when absent, as LLaVA-Med's loaders do), or (None, what is wrong)."""
    turns = rec.get("conversations", rec.get("conversatons"))
    if not isinstance(turns, list) or not turns:
        return None, "no conversations list"
    out = []
    for i, t in enumerate(turns):
        role = ("human", "gpt")[i % 2]
        if not isinstance(t, dict) or t.get("from") != role or not isinstance(t.get("value"), str):
            return None, f"turn {i} is not a {{from: {role}, value: text}} turn"
        if not t["value"].strip():
            return None, f"turn {i} ({role}) is empty"
        out.append({"from": role, "value": t["value"]})
    if len(out) % 2:
        return None, "the last human turn has no answer"
    if sum(t["value"].count(IMAGE) for t in out[1:]) or out[0]["value"].count(IMAGE) > 1:
        return None, f"{IMAGE} must appear once, in the first human turn"
    if rec.get("image") and IMAGE not in out[0]["value"]:
        out[0] = {"from": "human", "value": f"{IMAGE}\n{out[0]['value']}"}
    return out, ""


def load(cfg: Config, problems: Problems, out_dir: Path) -> Loaded:
    d, o = cfg.data, cfg.data.llava_med
    root = Path(d.root)
    loaded = Loaded("llava_med", d.image_dir(root / "images"), group_name="pmc_article")
    train_path = root / o.train_file
    rows = []
    for where, rec in read_json_records(train_path, problems):
        if rec.get("id") in (None, "") or not isinstance(rec.get("image", ""), str):
            problems.add("bad_record", where, "a record needs an `id` (and `image` as a path string)")
            continue
        turns, wrong = conversation(rec)
        if turns is None:
            problems.add("empty_report" if "empty" in wrong else "bad_record", where, wrong)
            continue
        rows.append((where, rec, turns))
    groups = pd.DataFrame({"group": [article(rec.get("pair_id") or rec["id"]) for _, rec, _ in rows]})
    split = grouped_split(groups.assign(_all="all"), "group", "_all", d.split_ratios, d.seed) if rows else []
    for (where, rec, turns), group, s in zip(rows, groups["group"], split):
        meta = {"dataset": "llava_med", "split": s, "task": "open", "group": group, "source": o.train_file}
        loaded.add(
            {"id": str(rec["id"]), "image": rec.get("image") or None, "conversations": turns, "meta": meta}, where
        )
    if o.eval_file:
        for where, rec in read_jsonl_records(root / o.eval_file, problems):
            answer = rec.get("gpt4_answer")
            if rec.get("question_id") is None or not isinstance(rec.get("text"), str) or not isinstance(answer, str):
                problems.add("bad_record", where, "a qa50 question needs question_id, text and gpt4_answer")
                continue
            if not rec["text"].strip() or not answer.strip():
                problems.add("empty_report", where, "empty question or gpt4_answer")
                continue
            text = rec["text"] if IMAGE in rec["text"] else f"{IMAGE}\n{rec['text']}"
            meta = {
                "dataset": "llava_med",
                "split": "test",
                "task": "open",
                "answer": answer,
                "group": article(rec.get("pair_id") or rec.get("image", "")),
                "source": o.eval_file,
                **{k: rec[k] for k in ("pair_id", "type", "fig_label", "domain") if k in rec},
            }
            loaded.add(
                {
                    "id": f"qa50-{rec['question_id']}",
                    "image": rec.get("image") or None,
                    "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}],
                    "meta": meta,
                },
                where,
            )
    loaded.summary = {
        "train_file": o.train_file,
        "eval_file": o.eval_file,
        "split": {"group": "pmc_article", "ratios": list(d.split_ratios), "seed": d.seed},
    }
    log.info(
        "llava_med: %d samples from %s%s", len(loaded.samples), o.train_file, f" + {o.eval_file}" if o.eval_file else ""
    )
    return loaded
