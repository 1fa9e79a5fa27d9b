"""LLaVA-Med question files (`model_vqa.py --question-file`) as samples infer can answer.

A row is `{"question_id", "image", "text"}` (LLaVA-Med puts the image placeholder first itself, so `text` may
have none; `question_id` keeps its type for answers.jsonl) plus optional fields read when present: the
reference (`answer`, else `gt_answer` / `gpt4_answer`),
`answer_type` (SLAKE / VQA-RAD CLOSED or OPEN -> task), `task`, `choices`, and any other scalar fields,
kept as meta (e.g. `content_type`, `modality`, which eval splits by).
"""

from __future__ import annotations

from pathlib import Path

from medlava.io import InputError, read_jsonl

ANSWER_KEYS = ("answer", "gt_answer", "gpt4_answer")
_TASKS = ("closed", "open", "report", "label")
_OWN = {"question_id", "image", "text", "task", "choices", *ANSWER_KEYS}


def question_sample(row: dict, where: str) -> dict:
    if "question_id" not in row or not isinstance(row.get("text"), str):
        raise InputError(
            f"{where}: a question needs `question_id` and a `text` string (LLaVA-Med question file); "
            f"got keys {sorted(row)}"
        )
    if not isinstance(row["question_id"], (str, int)) or isinstance(row["question_id"], bool):
        raise InputError(f"{where}: `question_id` must be a string or an integer, got {row['question_id']!r}")
    qid = str(row["question_id"])
    choices = row.get("choices")
    if choices is not None and (
        not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        raise InputError(f"{where} (question {qid}): `choices` must be a list of at least two non-empty strings")
    answer_type = str(row.get("answer_type", "")).lower()
    task = row.get("task") or (answer_type if answer_type in ("closed", "open") else "closed" if choices else "open")
    if task not in _TASKS:
        raise InputError(f"{where} (question {qid}): task {task!r} is not one of {list(_TASKS)}")
    image = row.get("image") or None
    text = row["text"].strip()
    if image:  # as model_vqa.py: the placeholder leads, wherever the file had it (qa50's questions end with it)
        text = "<image>\n" + text.replace("<image>", "").strip()
    meta = {k: v for k, v in row.items() if k not in _OWN and (v is None or isinstance(v, (str, int, float, bool)))}
    meta["task"] = task
    answer = next((row[k] for k in ANSWER_KEYS if row.get(k) is not None), None)
    if answer is not None:
        meta["answer"] = str(answer)
    if choices:
        meta["choices"] = [c.strip() for c in choices]
    return {
        "id": qid,
        "question_id": row["question_id"],
        "image": image,
        "conversations": [{"from": "human", "value": text}],
        "meta": meta,
    }


def read_questions(path: Path) -> list[dict]:
    """Samples of a question file; ids must be unique."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"question file {path} does not exist (infer.questions)")
    samples, seen = [], set()
    for i, row in enumerate(read_jsonl(path), 1):
        sample = question_sample(row, f"{path} row {i}")
        if sample["id"] in seen:
            raise InputError(f"{path} row {i}: duplicate question_id {sample['id']!r}; ids must be unique")
        seen.add(sample["id"])
        samples.append(sample)
    if not samples:
        raise InputError(f"{path}: no questions")
    return samples
