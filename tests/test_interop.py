"""Weights in the field's formats (pigeon.interop): tiny random diffusers, transformers and PEFT models
built here, saved with `save_pretrained`, imported into a Pigeon checkpoint and compared output for
output with the originals; the exports loaded back with `from_pretrained`. Nothing is downloaded."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from pigeon.checkpoint import load_checkpoint
from pigeon.config import preset
from pigeon.interop import InteropError, export_diffusers, export_peft, import_weights
from pigeon.models.unet import unet_forward
from pigeon.vocab import vocab_layout

TOL = 1e-5
CONTEXT, POOLED, TIME = 24, 16, 8


def diffusers_unet() -> UNet2DConditionModel:
    """SDXL's layout at toy size: heads of width 8, cross-attention width 24, linear projections,
    more transformer layers in the deeper block."""
    torch.manual_seed(1)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=CONTEXT,
        attention_head_dim=(4, 8),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME,
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
    ).eval()


# SDXL base 1.0's unet/config.json (stabilityai/stable-diffusion-xl-base-1.0), the keys that decide
# its tensors
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "num_attention_heads": None,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# its vae/config.json (the SDXL VAE)
SDXL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.13025,
}


def diffusers_vae() -> AutoencoderKL:
    torch.manual_seed(2)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.5,
    ).eval()


def llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(3)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    ).eval()


def with_lora(model: LlamaForCausalLM) -> PeftModel:
    peft = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    torch.manual_seed(4)
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter change the output
            p.data.normal_(0, 0.5)
    return peft.eval()


def unet_inputs(channels: int = 4):
    g = torch.Generator().manual_seed(5)
    return dict(
        sample=torch.randn(2, channels, 16, 16, generator=g),
        timestep=torch.tensor([10, 700]),
        encoder_hidden_states=torch.randn(2, 6, CONTEXT, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, POOLED, generator=g),
            "time_ids": torch.rand(2, 6, generator=g) * 32,
        },
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("field")
    vocab = vocab_layout(preset("tiny")).size
    diffusers_unet().save_pretrained(root / "unet")
    diffusers_vae().save_pretrained(root / "vae")
    lm = llama(vocab)
    lm.save_pretrained(root / "llm")
    with_lora(llama(vocab)).save_pretrained(root / "peft")
    llama(vocab + 100).save_pretrained(root / "llm_other_vocab")
    return root


@pytest.fixture(scope="module")
def imported(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    report = import_weights(
        out,
        preset_name="tiny",
        unet=folders / "unet",
        vae=folders / "vae",
        llm=folders / "llm",
        peft=folders / "peft",
    )
    return load_checkpoint(out), report


def test_imported_unet_reproduces_the_diffusers_model(imported):
    ckpt, report = imported
    assert set(report["imported"]) == {"unet", "vae", "llm", "peft"}
    config = ckpt.config
    assert (config.condition_adapter.context_dim, config.condition_adapter.pooled_dim) == (
        CONTEXT,
        POOLED,
    )
    assert config.unet.attention_head_dim == 8 and not config.unet.condition_sketch
    x = unet_inputs()
    with torch.no_grad():
        want = diffusers_unet()(**x).sample
        got = unet_forward(
            ckpt.model.unet,
            config,
            x["sample"],
            x["timestep"],
            x["encoder_hidden_states"],
            x["added_cond_kwargs"]["text_embeds"],
            x["added_cond_kwargs"]["time_ids"],
            None,
        )
    assert (got - want).abs().max() < TOL


def test_imported_vae_reproduces_the_diffusers_model(imported):
    ckpt, _ = imported
    assert ckpt.config.vae.scaling_factor == 0.5
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        reference = diffusers_vae()
        want = reference.decode(reference.encode(x).latent_dist.mean).sample
        got = ckpt.model.vae.decode(ckpt.model.vae.encode(x).latent_dist.mean).sample
    assert (got - want).abs().max() < TOL


def test_imported_llm_and_lora_reproduce_the_peft_model(imported):
    ckpt, _ = imported
    vocab = vocab_layout(preset("tiny")).size
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = with_lora(llama(vocab))(input_ids=ids).logits
        got = ckpt.model.personalizer.llm(input_ids=ids).logits
        base = llama(vocab)(input_ids=ids).logits
    assert (got - want).abs().max() < TOL
    assert (want - base).abs().max() > 1e-3  # the adapter does change the output
    assert ckpt.config.personalizer.lora_rank == 2


def test_an_llm_with_another_vocabulary_keeps_pigeons_and_says_so(folders, tmp_path):
    report = import_weights(tmp_path / "c", preset_name="tiny", llm=folders / "llm_other_vocab")
    kept = " ".join(report["kept_vocabulary"])
    assert "model.embed_tokens.weight" in kept and "lm_head.weight" in kept
    ckpt = load_checkpoint(tmp_path / "c")
    theirs = llama(vocab_layout(preset("tiny")).size + 100).state_dict()
    own = ckpt.model.personalizer.llm.state_dict()
    layer = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(own[layer], theirs[layer])  # the body is theirs


def test_export_round_trips_through_from_pretrained(imported, tmp_path):
    ckpt, _ = imported
    diffusers_out, peft_out = tmp_path / "diffusers", tmp_path / "peft"
    export_diffusers(ckpt.path, diffusers_out)
    export_peft(ckpt.path, peft_out)
    x = unet_inputs()
    vocab = vocab_layout(ckpt.config).size
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        unet = UNet2DConditionModel.from_pretrained(diffusers_out / "unet").eval()
        assert (unet(**x).sample - diffusers_unet()(**x).sample).abs().max() < TOL
        vae = AutoencoderKL.from_pretrained(diffusers_out / "vae").eval()
        image = torch.rand(1, 3, 32, 32)
        assert (
            vae.encode(image).latent_dist.mean - ckpt.model.vae.encode(image).latent_dist.mean
        ).abs().max() < TOL
        base = LlamaForCausalLM.from_pretrained(peft_out / "base").eval()
        peft = PeftModel.from_pretrained(base, peft_out / "adapter").eval()
        want = ckpt.model.personalizer.llm(input_ids=ids).logits
        assert (peft(input_ids=ids).logits - want).abs().max() < TOL
    # and back in: the exported folders give the same checkpoint
    again = import_weights(
        tmp_path / "again",
        preset_name="tiny",
        unet=diffusers_out / "unet",
        vae=diffusers_out / "vae",
        llm=peft_out / "base",
        peft=peft_out / "adapter",
    )
    assert not again["kept_vocabulary"]
    ckpt2 = load_checkpoint(tmp_path / "again")
    for name in ("unet", "vae"):
        a, b = getattr(ckpt.model, name).state_dict(), getattr(ckpt2.model, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pigeon_unet_channels_travel_with_the_export(tmp_path):
    """The condition sketch and the reference channels are Pigeon's: exported beside the diffusers
    files and read back on import, so a trained checkpoint round-trips exactly."""
    from pigeon.checkpoint import save_checkpoint
    from pigeon.models.pigeon import PigeonModel
    from pigeon.vocab import DEFAULT_CORPUS, TextTokenizer, train_text_tokenizer

    config = preset("tiny")
    model = PigeonModel(config)
    model.enable_reference_input()
    size = config.personalizer.text_vocab_size
    save_checkpoint(
        model, TextTokenizer(train_text_tokenizer(DEFAULT_CORPUS, size), size), tmp_path / "ckpt"
    )
    export_diffusers(tmp_path / "ckpt", tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "unet" / "pigeon_unet.json").read_text())
    assert meta["condition_sketch"] and meta["reference_input"] and len(meta["input_channels"]) == 3
    import_weights(tmp_path / "back", base=tmp_path / "ckpt", unet=tmp_path / "out" / "unet")
    a = model.unet.state_dict()
    b = load_checkpoint(tmp_path / "back").model.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InteropError, match="exists and is not empty"):
        export_diffusers(tmp_path / "ckpt", tmp_path / "out")


def test_the_exported_scheduler_is_the_schedule_the_unet_trained_on(tmp_path):
    """A UNet trained with v-prediction on the zero-terminal-SNR schedule is only usable in diffusers
    with that schedule: OUT/scheduler loads as a DDIMScheduler with our a_t and prediction type."""
    from diffusers import DDIMScheduler

    from pigeon.checkpoint import save_checkpoint
    from pigeon.config import apply_overrides
    from pigeon.diffusion.scheduler import alphas_cumprod
    from pigeon.models.pigeon import PigeonModel
    from pigeon.vocab import DEFAULT_CORPUS, TextTokenizer, train_text_tokenizer

    overrides = [
        "scheduler.prediction_type=v_prediction",
        "scheduler.zero_terminal_snr=true",
        "scheduler.timestep_spacing=trailing",
    ]
    config = apply_overrides(preset("tiny"), overrides)
    size = config.personalizer.text_vocab_size
    tokenizer = TextTokenizer(train_text_tokenizer(DEFAULT_CORPUS, size), size)
    save_checkpoint(PigeonModel(config), tokenizer, tmp_path / "ckpt")
    export_diffusers(tmp_path / "ckpt", tmp_path / "out")
    theirs = DDIMScheduler.from_pretrained(tmp_path / "out" / "scheduler")
    assert theirs.config.prediction_type == "v_prediction"
    assert theirs.config.timestep_spacing == "trailing"
    ours = alphas_cumprod(config.scheduler)
    a = theirs.alphas_cumprod.double().numpy()
    assert a[-1] == 0.0 and abs(a[:-1] - ours[:-1]).max() < 1e-5


def test_a_decoder_with_its_own_norm_groups_is_not_exported_as_diffusers(tmp_path):
    """diffusers' AutoencoderKL has one group count: a folder written from a regrouped decoder
    would load a different decoder, so the export refuses and leaves no folder behind."""
    from pigeon.checkpoint import save_checkpoint
    from pigeon.config import apply_overrides
    from pigeon.models.pigeon import PigeonModel
    from pigeon.vocab import DEFAULT_CORPUS, TextTokenizer, train_text_tokenizer

    config = apply_overrides(preset("tiny"), ["vae.decoder_norm_num_groups=4"])
    size = config.personalizer.text_vocab_size
    tokenizer = TextTokenizer(train_text_tokenizer(DEFAULT_CORPUS, size), size)
    save_checkpoint(PigeonModel(config), tokenizer, tmp_path / "ckpt")
    with pytest.raises(InteropError, match="vae.decoder_norm_num_groups=4 differs"):
        export_diffusers(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_what_does_not_fit_is_named(folders, tmp_path):
    import shutil

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folders / "unet" / "config.json", pickled / "config.json")
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(InteropError, match=r"only pickled weights \(diffusion_pytorch_model.bin\)"):
        import_weights(tmp_path / "a", preset_name="tiny", unet=pickled)

    sd15 = tmp_path / "sd15"
    shutil.copytree(folders / "unet", sd15)
    cfg = json.loads((sd15 / "config.json").read_text())
    cfg["down_block_types"] = ["CrossAttnDownBlock2D", "DownBlock2D"]
    (sd15 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match="down_block_types"):
        import_weights(tmp_path / "b", preset_name="tiny", unet=sd15)

    wide = tmp_path / "wide"
    shutil.copytree(folders / "unet", wide)
    cfg = json.loads((wide / "config.json").read_text())
    cfg["cross_attention_dim"] = 40  # the weights were saved for 24
    (wide / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match=r"tensor down_blocks\..*attn2.to_k.weight.*context_dim"):
        import_weights(tmp_path / "c", preset_name="tiny", unet=wide)

    gqa = tmp_path / "gqa"
    shutil.copytree(folders / "llm", gqa)
    cfg = json.loads((gqa / "config.json").read_text())
    cfg["num_key_value_heads"] = 2
    (gqa / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match="num_key_value_heads=2"):
        import_weights(tmp_path / "d", preset_name="tiny", llm=gqa)

    with pytest.raises(InteropError, match="nothing to import"):
        import_weights(tmp_path / "e", preset_name="tiny")


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_the_base_preset_has_sdxls_unet_and_vae_tensors(tmp_path):
    """An SDXL UNet and VAE load into `base` without surgery: built on the meta device (no memory),
    the two models have the same tensor names and shapes, but for Pigeon's own condition sketch
    (its weights and the input channels it adds), which an imported SDXL folder does not turn on;
    and `unet_config` maps SDXL's config.json onto exactly `base`'s UNet and condition widths."""
    from pigeon.interop import unet_config
    from pigeon.models.unet import build_unet
    from pigeon.models.vae import build_vae

    base = preset("base")
    with torch.device("meta"):
        ours, theirs = shapes(build_unet(base)), shapes(UNet2DConditionModel(**SDXL_UNET))
        our_vae, their_vae = shapes(build_vae(base)), shapes(AutoencoderKL(**SDXL_VAE))
    sketch = {k for k in ours if k.startswith("condition_sketch.")}
    assert sketch and set(ours) - sketch == set(theirs)
    assert {k for k in theirs if ours[k] != theirs[k]} == {"conv_in.weight"}
    assert ours["conv_in.weight"][1] == 2 * theirs["conv_in.weight"][1]  # latents + sketch
    assert our_vae == their_vae and base.vae.scaling_factor == SDXL_VAE["scaling_factor"]

    (tmp_path / "config.json").write_text(json.dumps(SDXL_UNET))
    mapped = unet_config(tmp_path, base)
    assert mapped.unet == dataclasses.replace(base.unet, condition_sketch=False)
    assert mapped.condition_adapter == base.condition_adapter
