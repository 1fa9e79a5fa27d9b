"""A small LLaVA-Med data release: llava_med_alignment_500k.json (image-caption pairs), llava_med_instruct_60k.json
(multi-turn, `<image>` at the end of the first question as in the release), llava_med_eval_qa50_qa.jsonl (the
eval question file's fields), and images/{pair_id}.jpg. Several figures per PMC article. For tests and demos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

ALIGNMENT, INSTRUCT, QA50 = (
    "llava_med_alignment_500k.json",
    "llava_med_instruct_60k.json",
    "llava_med_eval_qa50_qa.jsonl",
)
_CAPTIONS = (
    "Chest CT showing a mass in the right upper lobe.",
    "H&E stain of the resected tissue, x100.",
    "Axial MRI of the brain with a ring-enhancing lesion.",
)


def make_synthetic_llava_med(
    root: Path, n_articles: int = 10, figures_per_article: int = 2, n_eval_articles: int = 2, seed: int = 0
) -> Path:
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    align, instruct, qa = [], [], []
    for a in range(n_articles + n_eval_articles):
        pmid = str(17000000 + 7919 * a)
        for f in range(figures_per_article):
            pair = f"{pmid}_F{f + 1}"
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "images" / f"{pair}.jpg")
            caption = _CAPTIONS[(a + f) % len(_CAPTIONS)]
            if a >= n_articles:  # held-out articles make the eval file
                qa.append(
                    {
                        "question_id": len(qa),
                        "image": f"{pair}.jpg",
                        "pair_id": pair,
                        "text": "What is shown in the image?\n<image>",
                        "gpt4_answer": caption,
                        "fig_caption": caption,
                        "domain": {
                            "chest_xray": False,
                            "mri": "MRI" in caption,
                            "ct_scan": "CT" in caption,
                            "histology": "H&E" in caption,
                            "gross": False,
                        },
                        "type": "conversation",
                        "fig_label": f"Figure {f + 1}",
                    }
                )
                continue
            align.append(
                {
                    "id": pair,
                    "image": f"{pair}.jpg",
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe the figure."},
                        {"from": "gpt", "value": caption},
                    ],
                }
            )
            instruct.append(
                {
                    "id": pair,
                    "image": f"{pair}.jpg",
                    "pair_id": pair,
                    "conversatons": [
                        {"from": "human", "value": "What does the image show?\n<image>"},
                        {"from": "gpt", "value": caption},
                        {"from": "human", "value": "Which modality is it?"},
                        {"from": "gpt", "value": caption.split()[0]},
                    ],
                }
            )
    (root / ALIGNMENT).write_text(json.dumps(align, indent=1), encoding="utf-8")
    (root / INSTRUCT).write_text(json.dumps(instruct, indent=1), encoding="utf-8")
    (root / QA50).write_text("".join(json.dumps(q) + "\n" for q in qa), encoding="utf-8")
    return root
