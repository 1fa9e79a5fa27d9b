"""Write tests/reference/templates.json, vqa_scorer.json and mmmu_parsing.json by running the ORIGINAL LLaVA /
LLaVA-Med / MMMU functions on the cases of tests/reference_cases.py; the tests hold medlava to these outputs.

No original code is kept in this repository (LLaVA-Med is under the Microsoft Research License, which does not
allow redistributing its source; LLaVA and MMMU are Apache-2.0): the functions are read from your own clones, at the
commits pinned in SOURCES, and run unchanged. The VQA scorer is LLaVA-Med v1.0's in both of its forms: run_eval_batch.py
(README "Option 1", whose eval_results_med_datasets.jsonl the paper's table came from) and run_eval.py ("Option 2").
`--answers A --gt G` runs both (their id check and `evaluate`) on an answers.jsonl and its ground truth instead.

    PYTHONPATH=pkg python tests/reference/regenerate.py --llava ~/src/LLaVA --llava-med ~/src/LLaVA-Med \
        --mmmu ~/src/MMMU [--check]        # each clone is optional: only the files it feeds are written
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_cases import (  # noqa: E402
    CASES,
    CHOICES,
    REFERENCE,
    TEMPLATES,
    TOKENIZERS,
    applies,
    mmmu_choice_cases,
    mmmu_open_cases,
    scorer_cases,
    tokenizer,
)

SOURCES = {  # name: (repository, commit, licence)
    "llava": ("haotian-liu/LLaVA", "c121f0432da27facab705978f83c4ada465e46fd", "Apache-2.0"),
    "llava_med": ("microsoft/LLaVA-Med", "d406e3fc7c3d1e4c797a7676de18cbfd070b6d2c", "Microsoft Research License"),
    "llava_med_v1": (
        "microsoft/LLaVA-Med",
        "b9a98a736d2ef05bcf5ff345be6403fb3a664eaf (tag v1.0.0)",
        "Microsoft Research License",
    ),
    "mmmu": ("MMMU-Benchmark/MMMU", "bb0b95a945998d91dfef37e969e07d49d1139438", "Apache-2.0"),
}


def read(clone: Path, name: str, path: str) -> str:
    commit = SOURCES[name][1].split()[0]
    return subprocess.run(
        ["git", "-C", str(clone), "show", f"{commit}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def run_module(name: str, code: str, namespace: dict | None = None, package: str | None = None) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(namespace or {})
    mod.__package__ = package
    sys.modules[name] = mod
    exec(compile(code, name, "exec"), mod.__dict__)
    return mod


def definitions(code: str, names: set[str]) -> str:
    """The source of the named top-level functions and assignments, unchanged."""
    tree = ast.parse(code)
    keep = [
        n
        for n in tree.body
        if getattr(n, "name", None) in names
        or (isinstance(n, ast.Assign) and {getattr(t, "id", None) for t in n.targets} & names)
    ]
    return "\n\n".join(ast.get_source_segment(code, n) for n in keep)


def load_llava(llava: Path, llava_med: Path) -> types.SimpleNamespace:
    from collections.abc import Sequence

    import tokenizers
    import torch
    import transformers
    from packaging import version

    constants = run_module("llava_constants", read(llava, "llava", "llava/constants.py"))
    conv = run_module("llava_conversation", read(llava, "llava", "llava/conversation.py"))
    med_conv = run_module("llava_med_conversation", read(llava_med, "llava_med", "llava/conversation.py"))
    base = {"torch": torch, **{k: v for k, v in vars(constants).items() if k.isupper()}}
    mm = run_module(
        "llava_mm_utils", definitions(read(llava, "llava", "llava/mm_utils.py"), {"tokenizer_image_token"}), base
    )
    med_mm = run_module(
        "llava_med_mm_utils",
        definitions(read(llava_med, "llava_med", "llava/mm_utils.py"), {"tokenizer_image_token"}),
        base,
    )
    train = run_module(
        "llava_train",
        definitions(
            read(llava, "llava", "llava/train/train.py"),
            {
                "IS_TOKENIZER_GREATER_THAN_0_14",
                "preprocess_multimodal",
                "preprocess_llama_2",
                "preprocess_v1",
                "preprocess_plain",
                "preprocess",
            },
        ),
        {
            **base,
            "copy": copy,
            "transformers": transformers,
            "tokenizers": tokenizers,
            "version": version,
            "Dict": dict,
            "Sequence": Sequence,
            "conversation_lib": conv,
            "tokenizer_image_token": mm.tokenizer_image_token,
        },
    )
    return types.SimpleNamespace(constants=constants, conv=conv, med_conv=med_conv, med_mm=med_mm, train=train)


CONV_MODE = {"mistral_instruct": "mistral_instruct", "vicuna_v1": "v1", "plain": "plain"}


def original_train(o, template: str, tok, conversations: list[dict], has_image: bool) -> dict:
    """LLaVA train.py: LazySupervisedDataset's preprocess_multimodal (samples with an image) + preprocess."""
    o.conv.default_conversation = o.conv.conv_templates[CONV_MODE[template]]
    sources = [copy.deepcopy(conversations)]
    if has_image:
        sources = o.train.preprocess_multimodal(
            sources, types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
        )
    prompt = o.conv.default_conversation.copy()  # the string preprocess tokenizes, rebuilt for the record
    out = o.train.preprocess(sources, tok, has_image=has_image)
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    if template == "plain":
        text = sources[0][0]["value"] + sources[0][1]["value"] + prompt.sep
    else:
        prompt.messages = []
        for j, turn in enumerate(sources[0]):
            prompt.append_message(prompt.roles[j % 2], turn["value"])
        text = prompt.get_prompt()
    return {"text": text, "input_ids": ids, "labels": labels}


def original_vqa_prompt(o, template: str, tok, question: str) -> dict:
    """LLaVA-Med model_vqa.py's prompt (mm_use_im_start_end off), its lines as they are there."""
    qs = question.replace(o.constants.DEFAULT_IMAGE_TOKEN, "").strip()
    qs = o.constants.DEFAULT_IMAGE_TOKEN + "\n" + qs
    conv = o.med_conv.conv_templates[template].copy()
    conv.append_message(conv.roles[0], qs)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    return {"text": prompt, "input_ids": o.med_mm.tokenizer_image_token(prompt, tok)}


def templates_reference(o) -> dict:
    out: dict = {"sources": SOURCES, "image_token_index": o.constants.IMAGE_TOKEN_INDEX, "cases": []}
    for tok_name in TOKENIZERS:
        tok = tokenizer(tok_name)
        if not hasattr(tok, "legacy"):
            # preprocess_v1 reads this Llama-tokenizer attribute; the tiny byte-level BPE puts no space before
            # a text, so a round encodes alone as it does in the conversation: a legacy tokenizer's behaviour.
            tok.legacy = True
        for template in TEMPLATES:
            for name, has_image, conv in CASES:
                if not applies(template, has_image, conv):
                    continue
                row = {
                    "tokenizer": tok_name,
                    "template": template,
                    "case": name,
                    "train": original_train(o, template, tok, conv, has_image),
                }
                if has_image and template != "plain":
                    row["vqa_prompt"] = original_vqa_prompt(o, template, tok, conv[0]["value"])
                out["cases"].append(row)
            question = CASES[0][2][0]["value"]
            for choices in CHOICES:
                trains = [
                    original_train(
                        o, template, tok, [{"from": "human", "value": question}, {"from": "gpt", "value": c}], True
                    )
                    for c in choices
                ]
                out["cases"].append(
                    {
                        "tokenizer": tok_name,
                        "template": template,
                        "case": "choices",
                        "question": question,
                        "choices": choices,
                        "answer_ids": [
                            [t for t, y in zip(r["input_ids"], r["labels"]) if y != o.constants.IGNORE_INDEX]
                            for r in trains
                        ],
                    }
                )
    return out


def load_run_eval(llava_med: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """LLaVA-Med v1.0's llava/eval/run_eval_batch.py and run_eval.py with their eval_metrics package; `tabulate`
    returns its rows, so the numbers come back at full precision rather than as printed."""
    run_module("eval_metrics", "", package="eval_metrics").__path__ = []
    for part in ("glossary", "utils", "evaluate_metrics"):
        run_module(
            f"eval_metrics.{part}",
            read(llava_med, "llava_med_v1", f"llava/eval/eval_metrics/{part}.py"),
            package="eval_metrics",
        )
    mods = []
    for name in ("run_eval_batch", "run_eval"):
        mod = run_module(f"llava_med_{name}", read(llava_med, "llava_med_v1", f"llava/eval/{name}.py"))
        mod.tabulate = lambda rows, headers: {name: value for name, value in rows}
        mods.append(mod)
    return mods[0], mods[1]


def original_evaluate(run_eval, gt: list[dict], pred: list[dict]) -> dict:
    """`evaluate` in a scratch directory: run_eval_batch's opens correct_answers_file.json in the working one."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        os.chdir(tmp)
        try:
            return run_eval.evaluate(gt, pred, {"0": ["none"]})
        finally:
            os.chdir(cwd)


def _gt(i: int, reference: str, answer_type: str) -> dict:
    return {
        "id": i,
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": reference}],
        "answer_type": answer_type,
    }


def _totals(result: dict) -> dict:
    return {
        "closed_accuracy": result["yes/no accuracy"] / 100,
        "open_recall": result["recall"] / 100,
        "open_precision": result["precision"] / 100,
        "open_f1": result["f1 score"] / 100,
    }


def scorer_reference(batch, run_eval) -> dict:
    """Per case the originals' open recall/precision/F1 and closed hit (`evaluate` on that case alone as OPEN; as
    CLOSED beside one OPEN case, which both need to divide by), and `evaluate` on all cases at once. closed_hit is
    run_eval_batch.py's (the reference contained in the answer), closed_hit_run_eval run_eval.py's (also "yes"
    or "no" in the answer)."""
    gm = sys.modules["eval_metrics.glossary"]
    cases = []
    for i, (pred, ref) in enumerate(scorer_cases()):
        one = [{"question_id": i, "text": pred}]
        opened = original_evaluate(run_eval, [_gt(i, ref, "OPEN")], one)
        pair = ([_gt(i, ref, "CLOSED"), _gt(-1, "x", "OPEN")], one + [{"question_id": -1, "text": "x"}])
        closed, closed_run_eval = original_evaluate(batch, *pair), original_evaluate(run_eval, *pair)
        cases.append(
            {
                "prediction": pred,
                "reference": ref,
                "normalized_prediction": gm.normalize_word(pred.lower()),
                "normalized_reference": gm.normalize_word(ref.lower()),
                "open_recall": opened["recall"] / 100,
                "open_precision": opened["precision"] / 100,
                "open_f1": opened["f1 score"] / 100,
                "closed_hit": closed["yes/no accuracy"] / 100,
                "closed_hit_run_eval": closed_run_eval["yes/no accuracy"] / 100,
            }
        )
    types_ = ["CLOSED" if i % 3 == 0 else "OPEN" for i in range(len(cases))]
    gt = [_gt(i, c["reference"], t) for i, (c, t) in enumerate(zip(cases, types_))]
    pred = [{"question_id": i, "text": c["prediction"]} for i, c in enumerate(cases)]
    return {
        "sources": {"llava_med_v1": SOURCES["llava_med_v1"]},
        "answer_types": types_,
        "cases": cases,
        "evaluate": _totals(original_evaluate(batch, gt, pred)),
        "evaluate_run_eval": _totals(original_evaluate(run_eval, gt, pred)),
    }


def mmmu_reference(mmmu: Path) -> dict:
    """MMMU's parse_multi_choice_response (its random last resort recorded as null), parse_open_response and
    eval_open on the generated cases."""
    import numpy

    utils = run_module("mmmu_eval_utils", read(mmmu, "mmmu", "mmmu/utils/eval_utils.py"), {"np": numpy})
    utils.random = types.SimpleNamespace(choice=lambda choices: None)  # where it would guess, record that it did
    choice = [
        {"response": r, "options": o, "letter": utils.parse_multi_choice_response(r, list(o), o)}
        for r, o in mmmu_choice_cases()
    ]
    opened = []
    for response, gold in mmmu_open_cases():
        parsed = utils.parse_open_response(response)
        opened.append(
            {
                "response": response,
                "gold": gold,
                "parsed": sorted(map(repr, parsed)),
                "correct": utils.eval_open(gold, parsed),
            }
        )
    return {"sources": {"mmmu": SOURCES["mmmu"]}, "choice": choice, "open": opened}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llava", type=Path, help="a clone of haotian-liu/LLaVA (with --llava-med: templates.json)")
    ap.add_argument("--llava-med", type=Path, help="a clone of microsoft/LLaVA-Med with tag v1.0.0 (vqa_scorer.json)")
    ap.add_argument("--mmmu", type=Path, help="a clone of MMMU-Benchmark/MMMU (mmmu_parsing.json)")
    ap.add_argument("--check", action="store_true", help="compare with the stored files instead of writing them")
    ap.add_argument("--answers", type=Path, help="an answers.jsonl to run LLaVA-Med v1.0's evals on, with --gt")
    ap.add_argument("--gt", type=Path, help="its ground truth (LLaVA-Med test.json: id, conversations, answer_type)")
    args = ap.parse_args()
    batch, run_eval = load_run_eval(args.llava_med) if args.llava_med else (None, None)
    if args.answers:  # the scripts' __main__ for one file, minus their prints
        gt, pred = json.loads(args.gt.read_text()), run_eval.load_jsonl(args.answers)
        assert [item["id"] for item in gt] == [item["question_id"] for item in pred], "ids differ"
        print(
            json.dumps(
                {
                    "run_eval_batch": original_evaluate(batch, gt, pred),
                    "run_eval": original_evaluate(run_eval, gt, pred),
                }
            )
        )
        return
    results = {}
    if args.llava and args.llava_med:
        results["templates.json"] = templates_reference(load_llava(args.llava, args.llava_med))
    if args.llava_med:
        results["vqa_scorer.json"] = scorer_reference(batch, run_eval)
    if args.mmmu:
        results["mmmu_parsing.json"] = mmmu_reference(args.mmmu)
    if not results:
        ap.error("give the clones to run: --llava and --llava-med, and/or --mmmu")
    for name, data in results.items():
        path = REFERENCE / name
        if args.check:
            same = json.loads(path.read_text()) == json.loads(json.dumps(data))
            print(f"{path}: {'matches' if same else 'DIFFERS from'} the original's output")
        else:
            path.write_text(json.dumps(data, indent=1) + "\n")
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
