"""Validation during align/sft (train/validation.py) on the tiny model: the loss over the split equals what one
sample at a time gives (token-weighted), the accuracy equals option scoring one question at a time, the ranks'
shares add up to the whole, and both reach TensorBoard and the console."""

import os
from pathlib import Path

import pytest
import torch
from conftest import TINY
from medlava.config import load_config
from medlava.data.samples import load_prepared
from medlava.distributed import Dist
from medlava.infer.score import score_choices
from medlava.models.inputs import Encoder, collate
from medlava.models.llava import base_model_path, load_model, load_processor, num_image_tokens
from medlava.models.templates import IGNORE_INDEX
from medlava.stages.prepare import run as run_prepare
from medlava.train.validation import Validation, closed_questions, log_validation, share
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

CPU = torch.device("cpu")


def dist(rank: int, world: int) -> Dist:
    return Dist(rank, world, rank, CPU)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("validation")
    old = os.environ.get("MEDLAVA_CACHE")
    os.environ["MEDLAVA_CACHE"] = str(tmp / "cache")
    cfg = load_config(
        TINY,
        [
            f"output_root={tmp / 'runs'}",
            f"data.root={tmp / 'ham'}",
            "run_id=v",
            "data.synthetic.n_lesions=40",
            "sft.batch_size=3",
            "sft.eval_closed_samples=7",
        ],
    )
    samples, manifest = load_prepared(run_prepare(cfg), "val")
    base = base_model_path(cfg.model)
    model = load_model(base, cfg.model, torch.float32).eval()
    encoder = Encoder(
        load_processor(base, cfg.model),
        cfg.model.template,
        num_image_tokens(model),
        cfg.model.model_max_length,
        Path(manifest["image_root"]),
    )
    yield cfg, samples, model, encoder, Validation.of(samples, encoder, cfg.sft, cfg.model.template)
    if old is None:
        os.environ.pop("MEDLAVA_CACHE")
    else:
        os.environ["MEDLAVA_CACHE"] = old


def test_shares_are_equal_and_weigh_each_item_once():
    assert share(5, dist(0, 2)) == [(0, 1.0), (2, 1.0), (4, 1.0)]
    assert share(5, dist(1, 2)) == [(1, 1.0), (3, 1.0), (0, 0.0)]  # the repeat that evens the shares weighs 0
    shares = [share(1, dist(r, 4)) for r in range(4)]
    assert shares == [[(0, 1.0)], [(0, 0.0)], [(0, 0.0)], [(0, 0.0)]]
    for n, world in ((7, 3), (2, 8), (9, 1)):
        parts = [share(n, dist(r, world)) for r in range(world)]
        assert len({len(p) for p in parts}) == 1  # every rank makes the same forward passes (ZeRO-3)
        assert sorted(i for p in parts for i, w in p if w) == list(range(n))


def test_loss_is_the_token_weighted_mean_of_one_sample_at_a_time(tiny):
    _, samples, model, encoder, v = tiny
    nll = tokens = 0.0
    with torch.no_grad():
        for s in samples:
            batch = collate([encoder.train_item(s)], encoder.tokenizer.pad_token_id)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            nll, tokens = nll + model(**batch).loss.item() * n, tokens + n
    model.train()
    result = v.measure(model, dist(0, 1))
    assert model.training, "measure leaves the model in the mode it found it in"
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    halves = [v.loss_sums(model.eval(), dist(r, 2)) for r in range(2)]
    assert [a + b for a, b in zip(*halves)] == pytest.approx(v.loss_sums(model, dist(0, 1)), rel=1e-6)


def test_accuracy_is_option_scoring_on_a_fixed_subset(tiny):
    cfg, samples, model, encoder, v = tiny
    assert [s["id"] for s in v.closed] == [s["id"] for s in closed_questions(samples)][:7]
    assert [s["id"] for s in Validation.of(samples[::-1], encoder, cfg.sft, "mistral_instruct").closed] == [
        s["id"] for s in v.closed
    ]  # the subset depends on the ids, not on the file's order
    assert Validation.of(samples, encoder, cfg.sft, "plain").closed == []  # alignment prompts ask no question
    right = 0
    for s in v.closed:
        choices = s["meta"]["choices"]
        (lp,) = score_choices(
            model,
            [encoder.prompt_item(s)],
            [[encoder.answer_ids(s, c) for c in choices]],
            encoder.tokenizer.pad_token_id,
            CPU,
        )
        right += choices[lp.index(max(lp))] == s["conversations"][-1]["value"]
    result = v.measure(model, dist(0, 1))
    assert result["closed_accuracy"] == right / 7 and result["closed_n"] == 7
    assert v.right(model, dist(0, 2)) + v.right(model, dist(1, 2)) == right


def test_results_reach_tensorboard_and_the_console(tmp_path):
    lines: list[str] = []
    writer = SummaryWriter(str(tmp_path))
    log_validation(6, {"loss": 1.25, "closed_accuracy": 0.5, "closed_n": 8}, writer, lines.append)
    log_validation(9, {"loss": 1.0}, writer, lines.append)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == [(6, 1.25), (9, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("val/closed_accuracy")] == [(6, 0.5)]
    assert lines == [
        "step 6: validation loss 1.2500, closed-question accuracy 0.500 on 8 (option likelihood)",
        "step 9: validation loss 1.0000",
    ]
