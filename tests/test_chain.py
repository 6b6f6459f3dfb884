"""The image chain (`pigeon evaluate --chain`, pigeon.evaluation.chain) against second
implementations: its generated row is the pipeline's own output, its round trip is the VAE's modules
run by hand, its ground-truth row scores exactly like the evaluation's oracle, and its training link
and curves read what the loop logs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pigeon.checkpoint import load_checkpoint
from pigeon.evaluation import chain as C
from pigeon.evaluation.evaluate import Scorer
from pigeon.evaluation.methods import evaluation_requests
from pigeon.inference.pipeline import PigeonPipeline
from pigeon.inference.runners import TorchRunner

from .test_evaluation import nets, proc, random_net  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def pipe(checkpoint_dir):
    ckpt = load_checkpoint(checkpoint_dir)
    return PigeonPipeline(ckpt.config, ckpt.tokenizer, TorchRunner(ckpt.model))


def test_chain_rows_against_the_pipeline_and_the_vae(pipe, proc):  # noqa: F811
    cases = proc.cases[:3]
    strength = 0.6
    rows = C.chain_images(pipe, proc, cases, [1.0, strength], batch=3)  # the batch pipe() runs
    assert set(rows) == {
        "ground_truth",
        "vae_round_trip",
        *(f"{n}@{s:g}" for n in C.TOKEN_LINKS for s in (1.0, strength)),
    }
    np.testing.assert_array_equal(rows["ground_truth"], proc.truth(cases))
    # generated at a strength = what the pipeline itself returns for the same requests
    requests = evaluation_requests(proc, cases, pipe.config)
    for s in (1.0, strength):
        for r in requests:
            r.strength = s
        served = np.stack([r.image for r in pipe(requests)])
        np.testing.assert_array_equal(rows[f"generated@{s:g}"], served)
    # the round trip, by hand with the torch modules
    model = pipe.runner.model
    x = torch.from_numpy(proc.truth(cases)).float().permute(0, 3, 1, 2) / 255
    with torch.no_grad():
        mean = model.vae.encode(x * 2 - 1).latent_dist.mean
        decoded = ((model.vae.decode(mean).sample + 1) / 2).clamp(0, 1)
    by_hand = decoded.permute(0, 2, 3, 1).numpy() * 255
    assert np.abs(rows["vae_round_trip"].astype(float) - by_hand).max() <= 1.0
    # the target's own tokens differ from the history's: the rows are not one image repeated
    assert not np.array_equal(rows["target_tokens@1"], rows["history_tokens@1"])


def test_rows_are_scored_per_user_with_paired_bootstrap_intervals(proc, nets):  # noqa: F811
    """StyleAcc by hand (the style net's argmax against each user's style) and the interval as
    percentiles of the resampled means, the resamples shared by every row."""
    from pigeon.evaluation import metrics as M

    scorer = Scorer(proc, nets)
    cs = scorer.case_set(proc.cases)
    truth = proc.truth(proc.cases)
    rows = {"ground_truth": truth, "flipped": truth[:, ::-1].copy()}
    scores = C.score_rows(scorer, cs, rows, bootstrap=300, seed=4)
    indices = M.bootstrap_indices(len(proc.cases), 300, 4)
    styles = np.array([c.style for c in proc.cases])
    for name, images in rows.items():
        hits = (nets.style_probs(images).argmax(1) == styles).astype(float)
        row = scores[name]["style_acc"]
        assert row["mean"] == pytest.approx(hits.mean())
        low, high = np.quantile(hits[indices].mean(axis=1), [0.025, 0.975])
        assert (row["low"], row["high"]) == pytest.approx((low, high))
    assert "| flipped |" in C.markdown(scores, "# t")


def test_curves_keep_the_last_record_of_a_repeated_step(tmp_path):
    """A resumed stage logs some steps twice; the curve keeps the last of each and draws."""
    from pigeon.training.curves import plot_curves, read_log

    log = tmp_path / "log.jsonl"
    lines = [
        {"step": 0, "loss": 2.0},
        {"step": 10, "loss": 1.5},
        {"step": 10, "loss": 1.4},
        {
            "step": 19,
            "val_loss": 1.2,
            "link": "vae_round_trip",
            "link_style_acc": 0.3,
            "link_concept_r5": 0.5,
        },
    ]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = read_log(log)
    assert [r.get("loss", r.get("val_loss")) for r in records] == [2.0, 1.4, 1.2]
    pytest.importorskip("matplotlib")
    out = plot_curves(log, tmp_path / "curves.png", title="t")
    assert out is not None and out.stat().st_size > 1000
