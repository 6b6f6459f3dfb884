"""The training loop: the tiny recipe end to end, exact resume, DDP on 2 CPU processes, schedules."""

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pigeon.config import preset
from pigeon.core.masking import num_kept
from pigeon.core.prompt import PromptBuilder
from pigeon.training import objectives as O
from pigeon.training.frozen import image_latents
from pigeon.training.loop import fresh_model, train_all, train_stage
from pigeon.training.stages import STAGE_NAMES, set_trainable, stage_parameters

from .conftest import make_model

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_recipe_runs_every_stage_on_procedural_data(tmp_path):
    summaries = train_all(
        tmp_path / "run", preset_name="tiny", data_source="procedural", progress=False
    )
    assert [s["stage"] for s in summaries] == list(STAGE_NAMES)
    for s in summaries:
        out = Path(s["out"])
        assert (out / "best" / "pipeline.json").exists() and (
            out / "last" / "pipeline.json"
        ).exists()
        assert json.loads((out / "train_config.json").read_text())["stage"] == s["stage"]
        assert np.isfinite(s["last_loss"]) and s["completed"]
    image = summaries[1]
    assert image["last_loss"] < image["first_loss"]  # the diffusion loss goes down in 16 steps
    # the decoder stage turns the UNet's reference input on and changes nothing but the UNet
    before, after = (weights(tmp_path / "run" / s / "best") for s in ("image", "decoder"))
    c = preset("tiny").vae.latent_channels  # noisy latents + sketch, then + the reference
    assert before["unet.conv_in.weight"].shape[1] == 2 * c
    assert after["unet.conv_in.weight"].shape[1] == 3 * c
    changed = {
        k.split(".")[0] for k in after if k not in before or not torch.equal(after[k], before[k])
    }
    assert changed == {"unet"}
    lmm = json.loads((tmp_path / "run" / "lmm" / "best" / "unet" / "config.json").read_text())
    assert lmm["reference_input"] is True  # the later stages keep it
    dpo = summaries[-1]
    assert abs(dpo["first_loss"] - np.log(2)) < 1e-3  # policy == reference at the start


def test_tiny_recipe_trains_every_stage_on_user_data_then_generates_and_evaluates(tmp_path):
    """A user-data folder (the procedural shapes as items + interactions) through every stage: the
    reference is the target (train.reference=auto), the UNet takes no reference channels, and the
    final checkpoint generates and is scored by the user-data evaluation."""
    from pigeon.checkpoint import load_checkpoint
    from pigeon.config import ConfigError
    from pigeon.core.images import resize
    from pigeon.data.user_data import write_procedural_user_data
    from pigeon.evaluation.features import EfficientNetLite0, ENL0Config
    from pigeon.evaluation.metrics import normalize
    from pigeon.evaluation.user_eval import evaluate_user_data
    from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline
    from pigeon.inference.runners import TorchRunner

    data = tmp_path / "data"
    write_procedural_user_data(data, users=8, sequence_length=8, size=32, seed=0)
    summaries = train_all(
        tmp_path / "run", preset_name="tiny", data_source=str(data), progress=False
    )
    assert [s["stage"] for s in summaries] == list(STAGE_NAMES)
    assert all(s["completed"] and np.isfinite(s["last_loss"]) for s in summaries)
    for stage in STAGE_NAMES:
        config = json.loads((tmp_path / "run" / stage / "train_config.json").read_text())
        assert config["reference"] == "target"
    final = tmp_path / "run" / "dpo" / "best"
    assert weights(final)["unet.conv_in.weight"].shape[1] == 2 * preset("tiny").vae.latent_channels
    with pytest.raises(ConfigError, match="other_style needs data with a reference"):
        train_stage(
            "sft",
            tmp_path / "run",
            preset_name="tiny",
            data_source=str(data),
            overrides=["train.reference=other_style"],
            progress=False,
        )
    report = evaluate_user_data(
        final, data, tmp_path / "eval", split="val", bootstrap=50, enl0_size=64
    )
    assert report["windows"] == len(report["per_window"]["target_sim"]) >= 2
    assert "style_acc" in report["skipped_metrics"]
    # the first window again, by hand: the same request to the pipeline, the same ENL0 cosine
    from pigeon.data.user_data import load_user_data

    user = load_user_data(data)
    window = user.splits["val"][0]
    ckpt = load_checkpoint(final)
    pipe = PigeonPipeline(ckpt.config, ckpt.tokenizer, TorchRunner(ckpt.model))
    image = lambda item: resize(user.image(item), ckpt.config.image_size)  # noqa: E731
    request = GenerationRequest(
        history=[image(i) for i in window.history[-ckpt.config.personalizer.max_history :]],
        reference=image(window.target),
        text=user.items[window.target].caption,
        seed=0,
    )
    generated = pipe([request])[0].image
    enl0 = EfficientNetLite0(ENL0Config(image_size=64))
    g, t = enl0.pooled(np.stack([generated, request.reference]))
    assert report["per_window"]["target_sim"][0] == pytest.approx(
        float(normalize(g) @ normalize(t)), abs=1e-5
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*/model.safetensors")):
        out.update({f"{f.parent.name}.{k}": v for k, v in load_file(f).items()})
    return out


def test_resume_gives_the_uninterrupted_result(tmp_path):
    common = {
        "preset_name": "tiny",
        "data_source": "procedural",
        "progress": False,
        "overrides": ["train.steps=4", "train.val_every=2"],
    }
    train_stage("sft", tmp_path / "a", **common)
    first = train_stage("sft", tmp_path / "b", stop_after=2, **common)
    assert not first["completed"]
    second = train_stage("sft", tmp_path / "b", resume=True, **common)
    assert second["completed"]
    a, b = weights(tmp_path / "a" / "sft" / "last"), weights(tmp_path / "b" / "sft" / "last")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_model_overrides_apply_to_a_loaded_checkpoint(tmp_path, tokenizer):
    """`--set mask_generator.training=frozen` on a stage that starts from a checkpoint: the same
    weights under the changed config (it was silently ignored); a shape change is refused."""
    from pigeon.checkpoint import load_checkpoint, save_checkpoint
    from pigeon.config import ConfigError

    init = save_checkpoint(make_model(preset("tiny")), tokenizer, tmp_path / "init")
    common = {
        "preset_name": "tiny",
        "data_source": "procedural",
        "progress": False,
        "init": str(init),
    }
    steps = ["train.steps=2", "train.val_every=2"]
    train_stage(
        "sft", tmp_path / "run", overrides=[*steps, "mask_generator.training=frozen"], **common
    )
    trained = load_checkpoint(tmp_path / "run" / "sft" / "last")
    assert trained.config.mask_generator.training == "frozen"
    before, after = weights(init), weights(tmp_path / "run" / "sft" / "last")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("mask_generator."))
    with pytest.raises(ConfigError, match="history_encoder.codebook_size=32 changes the shape"):
        train_stage(
            "sft",
            tmp_path / "other",
            overrides=[*steps, "history_encoder.codebook_size=32"],
            **common,
        )


def log_losses(path: Path) -> list[float]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.integration
def test_two_process_ddp_matches_one_process(tmp_path):
    args = [
        "train",
        "lmm",
        "--preset",
        "tiny",
        "--data",
        "procedural",
        "--set",
        "train.steps=3",
        "--set",
        "train.log_every=1",
        "--set",
        "train.batch_size=4",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "pigeon.cli", *args, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "pigeon.cli",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = (
        log_losses(tmp_path / "one" / "lmm" / "log.jsonl"),
        log_losses(tmp_path / "two" / "lmm" / "log.jsonl"),
    )
    assert len(one) == len(two) == 3
    # Same global batch and gradients averaged across ranks. Not bit-equal: each rank averages the
    # cross-entropy over its own label tokens, one process over all of them, so sequences of
    # different lengths weigh slightly differently. Stated tolerance: 1% of the loss.
    np.testing.assert_allclose(two, one, rtol=1e-2)


def test_reference_mask_ratio_is_drawn_once_per_batch():
    config = preset("tiny")
    model = make_model(config)
    from pigeon.vocab import DEFAULT_CORPUS, TextTokenizer, train_text_tokenizer

    tokenizer = TextTokenizer(train_text_tokenizer(DEFAULT_CORPUS, 320), 320)
    g = torch.Generator().manual_seed(0)
    batch = O.PersonalizationBatch(
        torch.rand(3, 2, 3, 32, 32, generator=g),
        torch.rand(3, 3, 32, 32, generator=g),
        ["a", "b", "c"],
    )
    _, keep = O.sample_context(
        model, PromptBuilder(tokenizer, model.vocab), batch, generator=random.Random(5)
    )
    r = random.Random(5).uniform(0.0, 1.0)  # the one draw the whole batch used
    with torch.no_grad():
        _, hist_kept = model.history_encoder(O.encoder_input(model, batch.history.flatten(0, 1)))
        _, ref_kept = model.history_encoder(O.encoder_input(model, batch.target))
    for row in range(3):
        n_hist = int(hist_kept[2 * row : 2 * row + 2].sum())
        n_ref = int(ref_kept[row].sum())
        assert float(keep[row, n_hist : n_hist + n_ref].sum()) == num_kept(n_ref, r)
        assert float(keep[row, :n_hist].sum()) == num_kept(n_hist, 0.2)  # joint history top-k


def test_a_dpo_step_changes_lora_only_and_never_the_reference(tmp_path):
    config = preset("tiny")
    model = make_model(config).train()
    with torch.no_grad():
        for p in model.personalizer.lora_parameters():
            p.normal_(0, 0.1)
    reference = copy.deepcopy(model.personalizer).eval().requires_grad_(False)
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    trainable = set_trainable(model, "dpo")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    from pigeon.vocab import DEFAULT_CORPUS, TextTokenizer, train_text_tokenizer

    tokenizer = TextTokenizer(train_text_tokenizer(DEFAULT_CORPUS, 320), 320)
    g = torch.Generator().manual_seed(1)
    batch = O.PersonalizationBatch(
        torch.rand(2, 2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g), ["a", "b"]
    )
    loss = O.dpo_objective(
        model,
        reference,
        PromptBuilder(tokenizer, model.vocab),
        batch,
        [np.array([1, 2]), np.array([3])],
        [np.array([4]), np.array([5, 6])],
    )
    loss.backward()
    torch.optim.AdamW(trainable.values(), lr=1e-2).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    with pytest.raises(ValueError, match="unknown stage"):
        set_trainable(model, "ppo")


def test_sft_base_trains_the_llm_base_and_the_sft_set_and_nothing_else(tmp_path, checkpoint_dir):
    """`--set train.sft_base=true`: the LLM's base weights move beside the sft stage's own
    parameters; the image half stays as it was."""
    from pigeon.config import ConfigError

    summary = train_stage(
        "sft",
        tmp_path / "run",
        preset_name="tiny",
        init=str(checkpoint_dir),
        overrides=["train.sft_base=true", "train.steps=3"],
        progress=False,
    )
    before, after = weights(checkpoint_dir), weights(Path(summary["out"]) / "last")
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    model = make_model(preset("tiny"))
    allowed = set(stage_parameters(model, "sft", sft_base=True))
    base = set(stage_parameters(model, "lmm"))
    assert changed & base, "no base weight of the LLM moved"
    assert changed <= allowed, sorted(changed - allowed)
    with pytest.raises(ConfigError, match="choose one"):
        train_stage(
            "sft",
            tmp_path / "x",
            preset_name="tiny",
            init=str(checkpoint_dir),
            overrides=["train.sft_base=true", "train.lora_only=true"],
            progress=False,
        )


def test_sft_lora_only_changes_the_lora_and_nothing_else(tmp_path, checkpoint_dir):
    """`pigeon train sft --lora-only`: an adapter for `pigeon deploy --lora`; every other tensor of
    the checkpoint, the reference adapter and the mask generator included, is the one it started from."""
    from pigeon.config import ConfigError

    summary = train_stage(
        "sft",
        tmp_path / "run",
        preset_name="tiny",
        init=str(checkpoint_dir),
        overrides=["train.lora_only=true", "train.steps=3"],
        progress=False,
    )
    before, after = weights(checkpoint_dir), weights(Path(summary["out"]) / "last")
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert len(stage_parameters(make_model(preset("tiny")), "sft")) > len(
        stage_parameters(make_model(preset("tiny")), "sft", lora_only=True)
    )
    with pytest.raises(ConfigError, match="lora_only applies to the sft and dpo stages"):
        train_stage(
            "image",
            tmp_path / "x",
            preset_name="tiny",
            overrides=["train.lora_only=true"],
            progress=False,
        )


def test_image_stage_resume_keeps_the_latent_probe(tmp_path):
    """Without `unet.condition_sketch` the reconstruction head lives in the trainer state (not the
    served checkpoint): a resumed image stage ends where the uninterrupted one does, and the health
    log has condition_gain."""
    common = {
        "preset_name": "tiny",
        "data_source": "procedural",
        "progress": False,
        "overrides": [
            "train.steps=4",
            "train.val_every=2",
            "train.reconstruct_weight=1.0",
            "unet.condition_sketch=false",
        ],
    }
    train_stage("image", tmp_path / "a", **common)
    train_stage("image", tmp_path / "b", stop_after=2, **common)
    state = torch.load(tmp_path / "b" / "image" / "trainer_state.pt", weights_only=True)
    assert any(k.startswith("probe.") for k in state["heads"])
    train_stage("image", tmp_path / "b", resume=True, **common)
    a, b = weights(tmp_path / "a" / "image" / "last"), weights(tmp_path / "b" / "image" / "last")
    assert not any(k.startswith("probe") for k in a)  # training-only, not served
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = [
        json.loads(x) for x in (tmp_path / "a" / "image" / "log.jsonl").read_text().splitlines()
    ]
    assert any("condition_gain" in r for r in rows)


def test_init_wins_over_the_run_folders_earlier_stage(tmp_path, checkpoint_dir):
    """`--init` is what the stage starts from even where the run folder holds an earlier stage's
    checkpoint; without it the earlier stage is."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoint_dir, run / "image" / "best")
    common = {"preset_name": "tiny", "progress": False, "overrides": ["train.steps=1"]}
    train_stage("lmm", run, init=str(checkpoint_dir), **common)
    source = json.loads((run / "lmm" / "model_config.json").read_text())["source"]
    assert source == str(checkpoint_dir)
    train_stage("lmm", tmp_path / "run", **common)
    source = json.loads((run / "lmm" / "model_config.json").read_text())["source"]
    assert source == str(run / "image" / "best")


def test_decoder_style_term_trains_the_adapter_resumes_and_needs_labels(tmp_path, checkpoint_dir):
    """`--set train.style_weight=1` on the decoder stage: the UNet and the condition adapter move,
    the tokenizer and the personalizer do not; the style head lives in the trainer state, so a
    resumed run ends where the uninterrupted one does; data without style labels is refused."""
    from pigeon.config import ConfigError
    from pigeon.data.user_data import write_procedural_user_data

    common = {
        "preset_name": "tiny",
        "data_source": "procedural",
        "init": str(checkpoint_dir),
        "progress": False,
        "overrides": [
            "train.steps=4",
            "train.val_every=2",
            "train.style_weight=1.0",
            "train.history_token_share=0.5",
            "train.chain_users=0",
        ],
    }
    train_stage("decoder", tmp_path / "a", **common)
    train_stage("decoder", tmp_path / "b", stop_after=2, **common)
    state = torch.load(tmp_path / "b" / "decoder" / "trainer_state.pt", weights_only=True)
    assert set(state["heads"]) == {"style.weight", "style.bias"}
    train_stage("decoder", tmp_path / "b", resume=True, **common)
    a, b = (
        weights(tmp_path / "a" / "decoder" / "last"),
        weights(tmp_path / "b" / "decoder" / "last"),
    )
    for key in a:
        assert torch.equal(a[key], b[key]), key
    before = weights(checkpoint_dir)
    changed = {k.split(".")[0] for k in a if k in before and not torch.equal(a[k], before[k])}
    assert changed == {"unet", "condition_adapter"}, changed
    data = tmp_path / "data"
    write_procedural_user_data(data, users=4, sequence_length=8, size=32, seed=0)
    with pytest.raises(ConfigError, match="carries no style labels"):
        train_stage("decoder", tmp_path / "c", **{**common, "data_source": str(data)})


def test_vae_stage_sets_the_latent_scale_to_one_over_the_latents_std(tmp_path):
    """Latent diffusion's rule, recomputed by hand from the saved VAE on the same calibration draw."""
    from pigeon.checkpoint import load_checkpoint
    from pigeon.models.pigeon import to_tensor
    from pigeon.training.data import load_data
    from pigeon.training.loop import CALIBRATION_IMAGES, recipe

    train_stage("vae", tmp_path / "run", preset_name="tiny", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "vae" / "best")
    config = recipe("tiny")["vae"]
    data = load_data("procedural", ckpt.config.image_size)
    rng = np.random.default_rng([config.seed, CALIBRATION_IMAGES])
    draws = [
        data.images(rng, min(config.batch_size, CALIBRATION_IMAGES - start))[0]
        for start in range(0, CALIBRATION_IMAGES, config.batch_size)
    ]
    with torch.no_grad():
        x = to_tensor(np.concatenate(draws)) * 2 - 1
        std = float(ckpt.model.eval().vae.encode(x).latent_dist.mean.std())
    assert ckpt.config.vae.scaling_factor == pytest.approx(1 / std, rel=1e-4)
    assert ckpt.model.vae.config.scaling_factor == ckpt.config.vae.scaling_factor
    # the stages after it see unit-variance latents
    with torch.no_grad():
        latents = image_latents(ckpt.model, to_tensor(np.concatenate(draws)))
    assert float(latents.std()) == pytest.approx(1.0, rel=1e-3)


def test_decoder_batch_recolours_each_reference_from_its_users_history():
    """train.style_start: the decoder stage's references are its users' references recoloured
    from their histories (`recolour_image`, serving's step), drawn from the step's own generator."""
    from pigeon.core.style_start import recolour_image
    from pigeon.models.pigeon import to_tensor
    from pigeon.training.data import ProceduralData
    from pigeon.training.loop import Dist, TrainConfig, make_batch, step_rng

    data = ProceduralData(32)
    config = TrainConfig(stage="decoder", steps=1, batch_size=4, lr=1e-4, style_start="histogram")
    batch = make_batch(data, config, 7, Dist(), "cpu")
    users = data.users(step_rng(config.seed, 7), 4, config.history_length, config.noise_ratio)
    expected = to_tensor([recolour_image(u.reference, u.history, "histogram") for u in users])
    torch.testing.assert_close(batch["references"], expected)
    as_is = to_tensor([u.reference for u in users])
    assert (batch["references"] - as_is).abs().mean() > 0.01  # the recolouring changed them
    # style_start none draws as before: one history image, no noise, the reference as it is
    plain = make_batch(
        data, TrainConfig(stage="decoder", steps=1, batch_size=4, lr=1e-4), 7, Dist(), "cpu"
    )
    before = data.users(step_rng(config.seed, 7), 4, 1, 0.0)
    torch.testing.assert_close(plain["references"], to_tensor([u.reference for u in before]))


def test_precision_auto_takes_bf16_only_where_the_device_computes_it_natively(tmp_path, caplog):
    """The `small` recipe asks for "auto"; a stage records what it resolved to. On a CPU without
    native bf16 (oneDNN's own report), bf16 convolutions take PyTorch's slow path, so auto is fp32."""
    from pigeon.training.loop import recipe, resolve_precision

    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert recipe("small")["decoder"].precision == "auto"
    assert recipe("tiny")["decoder"].precision == "fp32"
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    with caplog.at_level("WARNING", logger="pigeon.training.loop"):
        assert resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept
    assert ("without native bf16" in caplog.text) == (not native)
    train_stage(
        "vae",
        tmp_path / "run",
        preset_name="tiny",
        data_source="procedural",
        overrides=["train.precision=auto", "train.steps=2"],
        progress=False,
    )
    saved = json.loads((tmp_path / "run" / "vae" / "train_config.json").read_text())
    assert saved["precision"] == ("bf16" if native else "fp32")


def test_fresh_model_is_the_same_draw_whatever_the_rng_state_before():
    """A stage rerun from a fresh model (docs/results/tools/lmm_baseline.py) starts from the weights
    an earlier fresh run started from, however much randomness was consumed in between."""
    config = preset("tiny")
    first = fresh_model(config).state_dict()
    torch.rand(1000)  # consume the global generator
    second = fresh_model(config).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(1)
    other = type(fresh_model(config))(config).state_dict()  # a draw from another seed
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())
