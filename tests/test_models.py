"""Per-component behaviour: shapes from the declarations, caches, masking, conditioning."""

import numpy as np
import pytest
import torch

from pigeon.config import preset
from pigeon.inference.runners import TorchRunner
from pigeon.models.export_wrappers import WRAPPERS, export_module
from pigeon.specs import component_specs, sample_inputs

from .conftest import make_model

ODD = {"batch": 3}  # a shape that is none of min / opt / max


def test_every_declared_component_has_a_wrapper(tiny_config):
    assert set(component_specs(tiny_config)) == set(WRAPPERS)


@pytest.mark.parametrize("name", list(WRAPPERS))
@pytest.mark.parametrize("point", ["min", "opt", "max", "odd"])
def test_outputs_have_the_declared_shapes_and_dtypes(tiny_model, tiny_config, name, point):
    spec = component_specs(tiny_config)[name]
    at = ODD if point == "odd" else point
    feeds = sample_inputs(spec, tiny_config, at)
    out = TorchRunner(tiny_model).run(name, feeds)
    values = spec.point(at)
    assert list(out) == spec.output_names
    for t in spec.outputs:
        assert out[t.name].shape == spec.shape_of(t, values), t.name
        assert out[t.name].dtype == np.dtype(t.dtype), t.name
        assert np.isfinite(out[t.name]).all(), t.name


def test_compiled_runner_matches_eager_and_keeps_declared_dtypes(tiny_model, tiny_config):
    """torch.compile'd components compute what eager does; under fp16 autocast the runner still
    returns the declared float32 (numpy-side scheduler math must not drop to fp16)."""
    name = "condition_adapter"
    spec = component_specs(tiny_config)[name]
    feeds = sample_inputs(spec, tiny_config, "opt")
    eager = TorchRunner(tiny_model).run(name, feeds)
    compiled = TorchRunner(tiny_model, compile={name: "default"})
    assert compiled.modules[name] is not TorchRunner(tiny_model).modules[name]
    out = compiled.run(name, feeds)
    for t in spec.outputs:
        np.testing.assert_allclose(out[t.name], eager[t.name], rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = TorchRunner(tiny_model).run(name, feeds)
    for t in spec.outputs:
        assert low[t.name].dtype == np.float32, t.name
        np.testing.assert_allclose(low[t.name], eager[t.name], rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="unknown component 'unett'"):
        TorchRunner(tiny_model, compile={"unett": "default"})


def test_small_preset_builds_and_runs_the_unet():
    config = preset("small")
    model = make_model(config)
    spec = component_specs(config)["unet"]
    out = TorchRunner(model).run("unet", sample_inputs(spec, config, "min"))
    assert out["noise_pred"].shape == (1, 4, 16, 16)


def test_history_encoder_is_deterministic_at_inference_and_keeps_a_token(tiny_model):
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids1, keep1 = tiny_model.history_encoder(images)
    ids2, keep2 = tiny_model.history_encoder(images)
    assert torch.equal(ids1, ids2) and torch.equal(keep1, keep2)
    assert (keep1.sum(dim=1) >= 1).all()
    assert ids1.min() >= 0 and ids1.max() < tiny_model.config.history_encoder.codebook_size


def test_quantizer_picks_the_nearest_unit_code(tiny_model):
    q = tiny_model.history_encoder.quantizer
    x = torch.randn(2, 5, tiny_model.config.history_encoder.vit_width)
    ids, z, z_q = q(x)
    codebook = torch.nn.functional.normalize(q.codebook.weight, dim=-1)
    brute = torch.cdist(z.reshape(-1, z.shape[-1]), codebook).argmin(dim=-1).view(2, 5)
    assert torch.equal(ids, brute)
    assert torch.allclose(z_q, codebook[ids])


def test_condition_adapter_handles_a_fully_masked_reference(tiny_model, tiny_config):
    p = tiny_config.history_encoder.num_patches
    module = export_module(tiny_model, "condition_adapter")
    ids = torch.randint(0, 64, (2, p))
    with torch.no_grad():
        prompt, pooled, reference = module(ids, torch.zeros(2, p, dtype=torch.long))
    assert torch.isfinite(prompt).all() and torch.isfinite(pooled).all()
    assert torch.allclose(reference, prompt.mean(dim=1))
    # tokens that are not kept do not influence the result
    with torch.no_grad():
        keep = torch.zeros(2, p, dtype=torch.long)
        keep[:, :5] = 1
        a = module(ids, keep)[0]
        ids2 = ids.clone()
        ids2[:, 5:] = (ids2[:, 5:] + 7) % 64
        b = module(ids2, keep)[0]
    torch.testing.assert_close(a, b)


def test_masked_history_tokens_embed_to_zero_and_emb_slot_is_the_adapter(tiny_model):
    p = tiny_model.personalizer
    v = tiny_model.vocab
    ids = torch.tensor([[5, v.visual_offset + 3, v.visual_offset + 4, v.emb, v.img_start]])
    keep = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0]])
    ref = torch.randn(1, tiny_model.config.condition_adapter.context_dim)
    with torch.no_grad():
        e = p.embed(ids, keep, ref)
    assert torch.count_nonzero(e[0, 1]) == 0  # masked history token: zero vector, position kept
    torch.testing.assert_close(e[0, 2], p.input_embeddings().weight[v.visual_offset + 4])
    torch.testing.assert_close(e[0, 3], p.reference_adapter(ref)[0])


def test_kv_cache_decode_equals_full_forward(tiny_model, tiny_config):
    """Prefill + one-token steps through the export wrapper == one pass over the whole sequence."""
    p = tiny_model.personalizer
    wrapper = export_module(tiny_model, "personalizer")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_model.vocab.size, (2, 9), generator=g)
    keep = torch.ones(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    ref = torch.randn(2, tiny_config.condition_adapter.context_dim, generator=g)
    with torch.no_grad():
        full, _ = p(ids, keep, ref, mask, pos)
        heads, hd = tiny_config.personalizer.num_heads, 8
        past = [torch.zeros(2, heads, 0, hd)] * (2 * p.num_layers)
        out = wrapper(ids[:, :6], keep[:, :6], ref, mask[:, :6], pos[:, :6], *past)
        steps = [out[0]]
        for t in range(6, 9):
            out = wrapper(
                ids[:, t : t + 1],
                keep[:, t : t + 1],
                ref,
                mask[:, : t + 1],
                pos[:, t : t + 1],
                *out[1:],
            )
            steps.append(out[0])
    allowed = wrapper.allowed_ids
    for j, t in enumerate(range(5, 9)):
        torch.testing.assert_close(steps[j], full[:, t, allowed], atol=1e-5, rtol=1e-4)


def test_lora_starts_as_identity_and_targets_q_and_v(tiny_model):
    names = [n for n, _ in tiny_model.personalizer.llm.named_parameters() if "lora_" in n]
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names)
    for n, param in tiny_model.personalizer.llm.named_parameters():
        if "lora_B" in n:
            assert torch.count_nonzero(param) == 0


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_attention_heads_have_the_configured_width(name):
    """diffusers reads `attention_head_dim` as the head count; the config's is the head width.
    Every self- and cross-attention of the built UNet must have heads of exactly that width."""
    from pigeon.models.unet import build_unet

    config = preset(name)
    width = config.unet.attention_head_dim
    with torch.device("meta"):  # base is SDXL-sized: its shapes, not its memory
        unet = build_unet(config)
    attentions = [m for n, m in unet.named_modules() if n.endswith(("attn1", "attn2"))]
    assert attentions
    for attn in attentions:
        channels = attn.to_q.out_features
        assert attn.heads == channels // width and channels // attn.heads == width


def test_files_written_before_the_head_layout_keep_their_head_count(tiny_config):
    """A unet config without `attention_head_layout` (the committed checkpoint's) builds the UNet
    those weights were trained in: `attention_head_dim` heads per block."""
    from pigeon import config as cfg
    from pigeon.models.unet import build_unet

    data = cfg.to_dict(preset("small"))
    del data["unet"]["attention_head_layout"], data["unet"]["condition_sketch"]
    old = cfg.from_dict(cfg.PipelineConfig, data)
    assert old.unet.attention_head_layout == "count" and not old.unet.condition_sketch
    heads = {m.heads for n, m in build_unet(old).named_modules() if n.endswith("attn2")}
    assert heads == {old.unet.attention_head_dim}


def test_condition_sketch_is_a_linear_map_of_the_condition(tiny_model, tiny_config):
    """The sketch channels hold Linear(flattened prompt_embeds) reshaped to the latents; the
    zeroed condition (CFG's negative) gives the bias alone; the UNet's input has C per part."""
    from pigeon.models.unet import input_channels, unet_input

    c, h = tiny_config.vae.latent_channels, tiny_config.latent_size
    ca = tiny_config.condition_adapter
    assert input_channels(tiny_config) == 2 * c
    sketch = tiny_model.unet.condition_sketch
    embeds = torch.randn(3, ca.num_queries, ca.context_dim)
    latents = torch.randn(3, c, h, h)
    x = unet_input(tiny_model.unet, tiny_config, latents, embeds, None)
    assert x.shape == (3, 2 * c, h, h)
    torch.testing.assert_close(x[:, :c], latents)
    expected = (embeds.reshape(3, -1) @ sketch.proj.weight.T + sketch.proj.bias).view(3, c, h, h)
    torch.testing.assert_close(x[:, c:], expected)
    zero = unet_input(tiny_model.unet, tiny_config, latents, embeds * 0, None)[:, c:]
    torch.testing.assert_close(zero, sketch.proj.bias.view(1, c, h, h).expand(3, -1, -1, -1))


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_vae_decoder_norms_have_the_configured_groups(name):
    """Each decoder GroupNorm has `vae.decoder_groups` groups, each encoder one `norm_num_groups`;
    the parameters keep their names and shapes, so a decoder regrouped by `--set` loads the
    weights it was trained with; every preset's groups hold 4 channels or more."""
    from pigeon.config import apply_overrides
    from pigeon.models.vae import build_vae

    config = preset(name)
    with torch.device("meta"):
        plain = build_vae(config)
        regrouped = build_vae(apply_overrides(config, ["vae.decoder_norm_num_groups=4"]))
    for vae, decoder_groups in ((plain, config.vae.decoder_groups), (regrouped, 4)):
        for part, groups in (("encoder", config.vae.norm_num_groups), ("decoder", decoder_groups)):
            norms = [m for m in getattr(vae, part).modules() if isinstance(m, torch.nn.GroupNorm)]
            assert norms and {m.num_groups for m in norms} == {groups}
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert shapes == {k: v.shape for k, v in regrouped.state_dict().items()}
    # no preset's VAE normalises a channel alone (the next test says why)
    norms = [m for m in plain.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert min(m.num_channels // m.num_groups for m in norms) >= 4


def test_a_decoder_norm_of_one_channel_per_group_loses_the_images_colour():
    """Why `decoder_norm_num_groups` exists: with a group per channel the decoder's last norm maps a
    feature map and the same map shifted by a constant (a flat region's colour) to one output; with
    groups of 4 channels a shift of one channel survives. Checked on the regrouped module itself."""
    from pigeon.config import ConfigError, VAEConfig, apply_overrides
    from pigeon.models.vae import build_vae

    config = preset("small")
    channels = config.vae.block_out_channels[0]  # 32 groups: the committed checkpoint's decoder
    instance = build_vae(apply_overrides(config, [f"vae.decoder_norm_num_groups={channels}"]))
    grouped = build_vae(apply_overrides(config, ["vae.decoder_norm_num_groups=8"]))
    x = torch.randn(2, channels, 8, 8)
    shifted = x.clone()
    shifted[:, 0] += 3.0  # one channel brighter everywhere
    with torch.no_grad():
        same = instance.decoder.conv_norm_out(x), instance.decoder.conv_norm_out(shifted)
        moved = grouped.decoder.conv_norm_out(x), grouped.decoder.conv_norm_out(shifted)
    torch.testing.assert_close(*same, atol=1e-5, rtol=1e-5)
    assert (moved[0] - moved[1]).abs().max() > 0.1
    with pytest.raises(ConfigError, match="decoder_norm_num_groups=3 does not divide"):
        VAEConfig(block_out_channels=(32, 64), decoder_norm_num_groups=3)
