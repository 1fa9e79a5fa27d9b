"""Model-based report metrics, run only when their weights are given: BERTScore (bert-score, any local or
cached transformers encoder) and CheXbert-embedding similarity (CXR-Report-Metric's s_emb)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medlava.eval.text import metrics_extra_missing
from medlava.io import InputError

log = logging.getLogger(__name__)
_UNBOUNDED = 1_000_000  # transformers' "no limit" model_max_length is ~1e30; bert-score passes it to truncation


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _layers(model: str, layers: int | None) -> int:
    if layers is not None:
        return layers
    from bert_score.utils import model2layers

    name = Path(model).name
    if name in model2layers:
        return model2layers[name]
    raise InputError(
        f"eval.bertscore_layers is not set and {model!r} is not one of bert-score's tuned models; "
        "give the layer to use (CXR-Report-Metric: distilroberta-base, layer 5)"
    )


def bertscore(
    hyps: Sequence[str],
    refs: Sequence[str],
    model: str,
    layers: int | None = None,
    baseline: str | None = None,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Per-pair BERTScore precision/recall/F1 (greedy cosine matching of contextual token embeddings,
    no idf), rescaled with `baseline` (bert-score's baseline TSV for this model and layer) when given."""
    try:
        from bert_score import BERTScorer
        from transformers import AutoTokenizer
    except ImportError as e:
        raise metrics_extra_missing(e, "BERTScore needs") from None
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.model_max_length > _UNBOUNDED:
        raise InputError(
            f"{model}: the tokenizer has no model_max_length; set it in tokenizer_config.json "
            "(512 for BERT/RoBERTa models)"
        )
    scorer = BERTScorer(
        model_type=model,
        num_layers=_layers(model, layers),
        batch_size=batch_size,
        device=str(_device()),
        lang="en" if baseline else None,
        rescale_with_baseline=baseline is not None,
        baseline_path=baseline,
    )
    # bert-score cannot encode an empty string (no tokens between the special ones); such a pair scores 0.
    keep = [i for i, (h, r) in enumerate(zip(hyps, refs)) if h.strip() and r.strip()]
    out = {k: np.zeros(len(hyps)) for k in ("bertscore_precision", "bertscore_recall", "bertscore_f1")}
    if keep:
        p, r, f = scorer.score(
            [hyps[i] for i in keep], [refs[i] for i in keep], batch_size=batch_size, verbose=True
        )  # its bars: embedding, then greedy matching
        for key, values in zip(out, (p, r, f)):
            out[key][keep] = values.numpy()
    return out


def load_chexbert(checkpoint: str | Path) -> torch.nn.Module:
    """The BERT encoder of a CheXbert checkpoint (`chexbert.pth`: {"model_state_dict": {"module.bert.*",
    "module.linear_heads.*"}}), its shape read from the weights (BERT convention: 64-wide heads)."""
    from transformers import BertConfig, BertModel

    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise InputError(f"{checkpoint}: not a readable CheXbert checkpoint ({e})") from None
    state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else {}
    bert = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("bert.") and not key.endswith("position_ids"):
            bert[key.removeprefix("bert.")] = value
    if "embeddings.word_embeddings.weight" not in bert:
        raise InputError(
            f"{checkpoint}: no `bert.*` weights; expected CheXbert's chexbert.pth "
            "(model_state_dict with module.bert.* keys)"
        )
    vocab, hidden = bert["embeddings.word_embeddings.weight"].shape
    n_layers = 1 + max(int(k.split(".")[2]) for k in bert if k.startswith("encoder.layer."))
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=bert["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=bert["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=bert["embeddings.token_type_embeddings.weight"].shape[0],
    )
    model = BertModel(config, add_pooling_layer="pooler.dense.weight" in bert)
    missing, unexpected = model.load_state_dict(bert, strict=False)
    if missing or unexpected:
        raise InputError(
            f"{checkpoint}: weights do not fit a BERT encoder (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.eval()


@torch.no_grad()
def chexbert_embeddings(texts: Sequence[str], model: torch.nn.Module, tokenizer, batch_size: int = 32) -> np.ndarray:
    """[CLS] vectors of the last layer, from CheXbert's report cleaning (one line, single spaces), 512 tokens."""
    device = _device()
    model = model.to(device)
    out = []
    bar = tqdm(total=len(texts), desc="CheXbert", unit="report", mininterval=5)
    for start in range(0, len(texts), batch_size):
        batch = [" ".join(str(t).split()) for t in texts[start : start + batch_size]]
        bar.update(len(batch))
        enc = tokenizer(
            batch, padding=True, truncation=True, max_length=min(512, tokenizer.model_max_length), return_tensors="pt"
        ).to(device)
        out.append(model(**enc).last_hidden_state[:, 0].float().cpu().numpy())
    bar.close()
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size))


def chexbert_similarity(
    hyps: Sequence[str], refs: Sequence[str], checkpoint: str, tokenizer_path: str, batch_size: int = 32
) -> np.ndarray:
    """Per-pair cosine similarity of CheXbert [CLS] embeddings (CXR-Report-Metric's semb_score)."""
    from transformers import AutoTokenizer

    model = load_chexbert(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    a = chexbert_embeddings(hyps, model, tokenizer, batch_size)
    b = chexbert_embeddings(refs, model, tokenizer, batch_size)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    log.info("chexbert similarity: %d pairs, checkpoint %s", len(a), checkpoint)
    return np.divide((a * b).sum(axis=1), norms, out=np.zeros(len(a)), where=norms > 0)
