"""Image-text retrieval recall@K in both directions, with what a random ranking would score.

Captions repeat (every melanoma on the back has the same one), so texts are the distinct captions: an image
finds its text when its caption is among the top K distinct captions; a caption finds its images when any
image with that caption is among the top K images. By hand: no library scores retrieval with repeated texts.
"""

from __future__ import annotations

import math

import numpy as np

KS = (1, 5, 10)


def retrieval_metrics(images: np.ndarray, texts: np.ndarray, captions: list[str], ks: tuple[int, ...] = KS) -> dict:
    """`images`, `texts`: L2-normalised embeddings of pair i's image and caption, (n, d) each."""
    distinct, first, inverse = np.unique(np.asarray(captions, dtype=object), return_index=True, return_inverse=True)
    sim = images @ texts[first].T  # (images, distinct captions)
    n, u = sim.shape
    own = sim[np.arange(n), inverse]
    i2t_rank = (sim > own[:, None]).sum(1)  # distinct captions scored above the image's own
    best_relevant = np.array([sim[inverse == j, j].max() for j in range(u)])
    t2i_rank = (sim > best_relevant[None, :]).sum(0)  # images scored above the caption's best image
    per_caption = np.bincount(inverse, minlength=u)
    out = {
        "n_images": int(n),
        "n_captions": int(u),
        "image_to_text": {},
        "text_to_image": {},
        "chance": {"image_to_text": {}, "text_to_image": {}},
    }
    for k in ks:
        out["image_to_text"][f"recall@{k}"] = float((i2t_rank < k).mean())
        out["text_to_image"][f"recall@{k}"] = float((t2i_rank < k).mean())
        out["chance"]["image_to_text"][f"recall@{k}"] = min(k / u, 1.0)
        # a random top-k of n images misses all m relevant ones with probability C(n-m, k) / C(n, k)
        top = min(k, n)
        miss = [math.comb(n - m, top) / math.comb(n, top) for m in per_caption.tolist()]
        out["chance"]["text_to_image"][f"recall@{k}"] = float(1 - np.mean(miss))
    return out


def describe(retrieval: dict) -> str:
    """Recall@K both ways beside what a random ranking scores: `image->text R@1 0.120 (chance 0.016), ...`."""

    def by_k(way: str) -> list[str]:  # metrics.json sorts its keys as text: recall@10 before recall@5
        return sorted(retrieval[way], key=lambda key: int(key.split("@")[1]))

    return "; ".join(
        f"{way.replace('_to_', '->')} "
        + ", ".join(
            f"R@{key.split('@')[1]} {retrieval[way][key]:.3f} (chance {retrieval['chance'][way][key]:.3f})"
            for key in by_k(way)
        )
        for way in ("image_to_text", "text_to_image")
    )
