"""Weights in the field's formats, in and out of a Pigeon checkpoint.

    pigeon checkpoint import --from CKPT | --preset P  [--unet DIR] [--vae DIR] [--llm DIR]
                             [--peft DIR] --out OUT
    pigeon checkpoint export-diffusers CKPT --out DIR    DIR/unet, DIR/vae: diffusers folders
    pigeon checkpoint export-peft CKPT --out DIR         DIR/base: transformers LlamaForCausalLM,
                                                         DIR/adapter: the personalizer's LoRA (PEFT)

Formats: a diffusers `UNet2DConditionModel` and `AutoencoderKL` folder (config.json +
diffusion_pytorch_model.safetensors), a transformers LLaMA-family causal LM folder (config.json +
model.safetensors), a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
safetensors only: a folder that holds only pickled weights (*.bin, *.pt, *.pth, *.ckpt) is refused
by name, since unpickling runs code.

What fits. Pigeon's UNet is diffusers' `UNet2DConditionModel` in the SDXL layout (a plain first down
block, cross-attention blocks after it, `text_time` added conditioning, any transformer layers per
block, linear or 1x1-convolution projections); the `base` preset is SDXL's shapes, so an SDXL UNet
and VAE load into it as they are. The config is read off the folder's config.json, and the condition
adapter's widths follow it (cross_attention_dim -> condition_adapter.context_dim, the pooled width
from projection_class_embeddings_input_dim). Pigeon's own input channels beside the noisy latents
(the condition sketch, the reference's latents) travel as `condition_sketch.safetensors` and
`pigeon_unet.json` beside the diffusers files. The LLM's body loads when its shapes match
`personalizer.*`; an LLM whose vocabulary is not Pigeon's (text BPE + image codes + specials) keeps
Pigeon's embeddings and output head, and the report says so. Whatever does not fit is an
`InteropError` that names the tensor or the config key.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
from pathlib import Path

import torch

from pigeon.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pigeon.config import ConfigError, PipelineConfig, preset
from pigeon.files import replace_dir, staging_dir, write_atomic

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
SKETCH_WEIGHTS = "condition_sketch.safetensors"
PIGEON_UNET = "pigeon_unet.json"
PEFT_PREFIX = "base_model.model."
ADAPTER = "default"  # the adapter name peft gives the personalizer's injected LoRA
# LlamaConfig values the personalizer builds with; an LLM with others would compute something else
LLAMA_FIXED = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "mlp_bias": False,
}
LLAMA_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


class InteropError(CheckpointError):
    """Weights or a config in a field format that do not fit Pigeon; the message names what."""


# --- reading folders -----------------------------------------------------------------------------


def _read_config(folder: Path, name: str = "config.json") -> dict:
    path = folder / name
    if not path.is_file():
        raise InteropError(f"{folder}: no {name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InteropError(f"{path}: not valid JSON ({exc.msg})") from None


def _read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / name
    if not path.is_file():
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise InteropError(
                f"{folder}: only pickled weights ({', '.join(pickled)}); Pigeon loads safetensors "
                f"only (expected {name}): convert them where you trust the file"
            )
        raise InteropError(f"{folder}: no {name}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise InteropError(f"{path}: unreadable safetensors ({exc})") from None


def _load_strict(module: torch.nn.Module, state: dict, where: str, key_of: dict | None = None):
    """Load `state` into `module` exactly: a missing, extra or misshapen tensor is named."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise InteropError(
            f"{where}: tensors do not match Pigeon's "
            + (f"(missing {missing[:3]}{' ...' if len(missing) > 3 else ''}) " if missing else "")
            + (f"(unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''})" if extra else "")
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            hint = next((c for prefix, c in (key_of or {}).items() if k.startswith(prefix)), None)
            raise InteropError(
                f"{where}: tensor {k} has shape {tuple(v.shape)}, Pigeon's config gives "
                f"{tuple(own[k].shape)}" + (f" (config key {hint})" if hint else "")
            )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


# --- config mapping ------------------------------------------------------------------------------


def _expect(where: str, key: str, got, want) -> None:
    if got != want:
        raise InteropError(f"{where}: config.json {key}={got!r}; Pigeon needs {want!r}")


def unet_config(folder: Path, config: PipelineConfig) -> PipelineConfig:
    """The PipelineConfig whose UNet (and condition widths) is the diffusers folder's."""
    c = _read_config(folder)
    where = f"{folder}"
    blocks = tuple(c["block_out_channels"])
    n = len(blocks)
    _expect(
        where,
        "down_block_types",
        list(c["down_block_types"]),
        ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
    )
    _expect(
        where,
        "up_block_types",
        list(c["up_block_types"]),
        ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
    )
    _expect(where, "addition_embed_type", c.get("addition_embed_type"), "text_time")
    layers = c.get("transformer_layers_per_block", 1)
    if isinstance(layers, int):
        layers = [layers] * n
    if not (isinstance(layers, list) and len(layers) == n and all(type(v) is int for v in layers)):
        raise InteropError(
            f"{where}: config.json transformer_layers_per_block={layers!r}; Pigeon's "
            "unet.transformer_layers_per_block takes one count per block"
        )
    heads = c.get("num_attention_heads") or c["attention_head_dim"]  # diffusers: heads per block
    heads = heads if isinstance(heads, list) else [heads] * n
    widths = {ch // h for ch, h in zip(blocks, heads, strict=True)}
    if len(widths) == 1 and not any(ch % h for ch, h in zip(blocks, heads, strict=True)):
        head_dim, layout = widths.pop(), "width"
    elif len(set(heads)) == 1:  # as Pigeon built UNets before unet.attention_head_layout
        head_dim, layout = heads[0], "count"
    else:
        raise InteropError(
            f"{where}: config.json attention_head_dim={heads!r} gives heads of unequal width over "
            f"block_out_channels={list(blocks)}; Pigeon's unet.attention_head_dim is one width "
            "(or one head count)"
        )
    latent = int(c["out_channels"])
    time_dim = int(c["addition_time_embed_dim"])
    pooled = int(c["projection_class_embeddings_input_dim"]) - 6 * time_dim
    extra = _read_config(folder, PIGEON_UNET) if (folder / PIGEON_UNET).is_file() else {}
    sketch = bool(extra.get("condition_sketch", False))
    reference = bool(extra.get("reference_input", False))
    _expect(where, "in_channels", int(c["in_channels"]), latent * (1 + sketch + reference))
    unet = dataclasses.replace(
        config.unet,
        block_out_channels=blocks,
        layers_per_block=int(c["layers_per_block"]),
        attention_head_dim=head_dim,
        attention_head_layout=layout,
        addition_time_embed_dim=time_dim,
        norm_num_groups=int(c["norm_num_groups"]),
        reference_input=reference,
        condition_sketch=sketch,
        transformer_layers_per_block=() if set(layers) == {1} else tuple(layers),
        use_linear_projection=bool(c.get("use_linear_projection", False)),
    )
    adapter = dataclasses.replace(
        config.condition_adapter, context_dim=int(c["cross_attention_dim"]), pooled_dim=pooled
    )
    vae = dataclasses.replace(config.vae, latent_channels=latent)
    try:
        return dataclasses.replace(config, unet=unet, condition_adapter=adapter, vae=vae)
    except ConfigError as exc:
        raise InteropError(f"{where}: {exc}") from None


def vae_config(folder: Path, config: PipelineConfig) -> PipelineConfig:
    c = _read_config(folder)
    n = len(c["block_out_channels"])
    for key, want in (
        ("in_channels", 3),
        ("out_channels", 3),
        ("down_block_types", ["DownEncoderBlock2D"] * n),
        ("up_block_types", ["UpDecoderBlock2D"] * n),
    ):
        _expect(str(folder), key, c[key] if key in c else None, want)
    vae = dataclasses.replace(
        config.vae,
        block_out_channels=tuple(c["block_out_channels"]),
        layers_per_block=int(c["layers_per_block"]),
        latent_channels=int(c["latent_channels"]),
        norm_num_groups=int(c["norm_num_groups"]),
        decoder_norm_num_groups=0,  # diffusers' decoder has the encoder's groups
        scaling_factor=float(c.get("scaling_factor", 1.0)),
    )
    if vae.latent_channels != config.vae.latent_channels:
        raise InteropError(
            f"{folder}: config.json latent_channels={vae.latent_channels}, but the UNet takes "
            f"{config.vae.latent_channels} (vae.latent_channels)"
        )
    return dataclasses.replace(config, vae=vae)


def llm_config(folder: Path, config: PipelineConfig) -> PipelineConfig:
    c = _read_config(folder)
    where = str(folder)
    if c.get("model_type") != "llama":
        raise InteropError(
            f"{where}: config.json model_type={c.get('model_type')!r}; the personalizer is a "
            "LLaMA-family causal LM (model_type 'llama')"
        )
    heads = int(c["num_attention_heads"])
    _expect(where, "num_key_value_heads", int(c.get("num_key_value_heads", heads)), heads)
    if c.get("head_dim") not in (None, int(c["hidden_size"]) // heads):
        raise InteropError(
            f"{where}: config.json head_dim={c['head_dim']} is not hidden_size/heads"
        )
    for key, want in LLAMA_FIXED.items():
        _expect(where, key, c.get(key, want), want)
    # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling
    rope = c.get("rope_parameters") or {
        "rope_type": (c.get("rope_scaling") or {}).get("rope_type", "default"),
        "rope_theta": c.get("rope_theta") or LLAMA_ROPE["rope_theta"],
    }
    got = {"rope_type": rope.get("rope_type", "default"), "rope_theta": float(rope["rope_theta"])}
    _expect(where, "rope_parameters", got, LLAMA_ROPE)
    personalizer = dataclasses.replace(
        config.personalizer,
        hidden_size=int(c["hidden_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=heads,
        intermediate_size=int(c["intermediate_size"]),
        max_positions=int(c.get("max_position_embeddings", config.personalizer.max_positions)),
    )
    return dataclasses.replace(config, personalizer=personalizer)


def peft_config(folder: Path, config: PipelineConfig) -> PipelineConfig:
    from pigeon.models.personalizer import LORA_TARGETS

    c = _read_config(folder, "adapter_config.json")
    where = str(folder)
    _expect(where, "peft_type", c.get("peft_type"), "LORA")
    _expect(where, "target_modules", sorted(c.get("target_modules") or []), sorted(LORA_TARGETS))
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            raise InteropError(f"{where}: adapter_config.json {key} is set; Pigeon has one rank")
    if c.get("use_dora") or c.get("use_rslora"):
        raise InteropError(f"{where}: adapter_config.json use_dora/use_rslora; Pigeon's is LoRA")
    personalizer = dataclasses.replace(
        config.personalizer, lora_rank=int(c["r"]), lora_alpha=int(c["lora_alpha"])
    )
    return dataclasses.replace(config, personalizer=personalizer)


# --- import --------------------------------------------------------------------------------------


def _llm_weights(state: dict, model) -> tuple[dict, list[str]]:
    """A transformers LlamaForCausalLM state -> the personalizer's LLM keys (LoRA layers name the
    frozen weight `base_layer`); the vocabulary tensors stay Pigeon's when the sizes differ."""
    from pigeon.models.personalizer import LORA_TARGETS

    own = model.personalizer.llm.state_dict()
    out, kept = {}, []
    for k, v in state.items():
        target = k
        for proj in LORA_TARGETS:
            target = target.replace(f".{proj}.weight", f".{proj}.base_layer.weight")
            target = target.replace(f".{proj}.bias", f".{proj}.base_layer.bias")
        vocabulary = target == "model.embed_tokens.weight" or target.startswith("lm_head.")
        if vocabulary and target in own and own[target].shape != v.shape:
            kept.append(f"{target} (vocab {v.shape[0]} -> Pigeon's {own[target].shape[0]})")
            out[target] = own[target]
            continue
        out[target] = v
    out.update({k: v for k, v in own.items() if "lora_" in k})  # LoRA comes from --peft or init
    return out, kept


def import_weights(
    out: str | Path,
    *,
    base: str | Path | None = None,
    preset_name: str = "base",
    unet: str | Path | None = None,
    vae: str | Path | None = None,
    llm: str | Path | None = None,
    peft: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """A Pigeon checkpoint from field-format folders; the components not given come from `base`
    (a Pigeon checkpoint) or a fresh `preset_name` model. -> a report of what came from where."""
    from pigeon.models.pigeon import PigeonModel
    from pigeon.vocab import DEFAULT_CORPUS, TextTokenizer, train_text_tokenizer

    if not any((unet, vae, llm, peft)):
        raise InteropError("nothing to import: give --unet, --vae, --llm or --peft")
    if base is not None:
        ckpt = load_checkpoint(base)
        config, tokenizer, start = ckpt.config, ckpt.tokenizer, ckpt.model
    else:
        config = preset(preset_name)
        size = config.personalizer.text_vocab_size
        tokenizer = TextTokenizer(train_text_tokenizer(DEFAULT_CORPUS, size), size)
        start = None
    folders = {
        k: Path(v) for k, v in (("unet", unet), ("vae", vae), ("llm", llm), ("peft", peft)) if v
    }
    for name, folder in folders.items():
        if not folder.is_dir():
            raise InteropError(f"--{name} {folder}: no such folder")
    if "unet" in folders:
        config = unet_config(folders["unet"], config)
    if "vae" in folders:
        config = vae_config(folders["vae"], config)
    if "llm" in folders:
        config = llm_config(folders["llm"], config)
    if "peft" in folders:
        config = peft_config(folders["peft"], config)
    torch.manual_seed(0)
    model = PigeonModel(config)
    report: dict = {
        "imported": {},
        "from_base": [],
        "partly_from_base": {},  # component: "k of n tensors" (the rest start fresh)
        "fresh": [],
        "kept_vocabulary": [],
    }
    imported_modules = {"unet", "vae"} & set(folders)
    for name, module in model.components().items():
        if name in imported_modules:
            continue
        own = module.state_dict()
        theirs = getattr(start, name).state_dict() if start is not None else {}
        fits = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
        module.load_state_dict({**own, **fits})  # every tensor of the base whose shape still fits
        if len(fits) == len(own):
            report["from_base"].append(name)
        elif fits:
            report["partly_from_base"][name] = f"{len(fits)} of {len(own)} tensors"
        else:
            report["fresh"].append(name)
    if "unet" in folders:
        state = _read_weights(folders["unet"], DIFFUSERS_WEIGHTS)
        if config.unet.condition_sketch:
            sketch = _read_weights(folders["unet"], SKETCH_WEIGHTS)
            state.update({f"condition_sketch.{k}": v for k, v in sketch.items()})
        _load_strict(model.unet, state, f"--unet {folders['unet']}", UNET_KEYS)
        report["imported"]["unet"] = str(folders["unet"])
    if "vae" in folders:
        state = _read_weights(folders["vae"], DIFFUSERS_WEIGHTS)
        _load_strict(model.vae, state, f"--vae {folders['vae']}", VAE_KEYS)
        report["imported"]["vae"] = str(folders["vae"])
    if "llm" in folders:
        state, kept = _llm_weights(_read_weights(folders["llm"], TRANSFORMERS_WEIGHTS), model)
        _load_strict(model.personalizer.llm, state, f"--llm {folders['llm']}", LLM_KEYS)
        report["imported"]["llm"] = str(folders["llm"])
        report["kept_vocabulary"] = kept
    if "peft" in folders:
        state = _read_weights(folders["peft"], PEFT_WEIGHTS)
        own = model.personalizer.llm.state_dict()
        lora = {}
        for k, v in state.items():
            if not k.startswith(PEFT_PREFIX):
                raise InteropError(f"--peft {folders['peft']}: tensor {k} lacks {PEFT_PREFIX!r}")
            name = k.removeprefix(PEFT_PREFIX)
            name = name.replace(".lora_A.weight", f".lora_A.{ADAPTER}.weight")
            name = name.replace(".lora_B.weight", f".lora_B.{ADAPTER}.weight")
            lora[name] = v
        _load_strict(
            model.personalizer.llm,
            {**{k: v for k, v in own.items() if "lora_" not in k}, **lora},
            f"--peft {folders['peft']}",
            {"model.layers": "personalizer.lora_rank"},
        )
        report["imported"]["peft"] = str(folders["peft"])
    save_checkpoint(
        model, tokenizer, out, overwrite=overwrite, extra={"imported": report["imported"]}
    )
    return {"out": str(out), **report}


# Which config key sets the leading part of a tensor's name (for the shape errors).
UNET_KEYS = {
    "conv_in": "unet.block_out_channels[0] / in_channels",
    "add_embedding": "condition_adapter.pooled_dim / unet.addition_time_embed_dim",
    "down_blocks": "unet.block_out_channels / condition_adapter.context_dim",
    "up_blocks": "unet.block_out_channels / condition_adapter.context_dim",
    "mid_block": "unet.block_out_channels / condition_adapter.context_dim",
    "condition_sketch": "condition_adapter.context_dim / vae.latent_channels",
}
VAE_KEYS = {"encoder": "vae.block_out_channels", "decoder": "vae.block_out_channels"}
LLM_KEYS = {
    "model.embed_tokens": "personalizer vocabulary / hidden_size",
    "model.layers": "personalizer.hidden_size / intermediate_size / num_heads",
    "lm_head": "personalizer vocabulary / hidden_size",
}


# --- export --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _new_folder(out: str | Path):
    """Write into a staging folder beside `out`, renamed into place only when every file is written:
    an interrupted export leaves no half folder. `out` must be new or empty."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InteropError(f"--out {out}: exists and is not empty; choose a new folder")
    staging = staging_dir(out)
    try:
        yield staging
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export_diffusers(checkpoint: str | Path, out: str | Path) -> dict:
    """OUT/unet and OUT/vae as diffusers folders (`from_pretrained` loads them), and OUT/scheduler,
    the DDIMScheduler of the schedule the UNet was trained on (its prediction type and, with
    `scheduler.zero_terminal_snr`, the rescaled betas); the UNet's Pigeon-only input channels are
    described in OUT/unet/pigeon_unet.json."""
    ckpt = load_checkpoint(checkpoint)
    with _new_folder(out) as staging:
        _write_diffusers(ckpt, staging)
    out = Path(out)
    return {
        "out": str(out),
        "unet": str(out / "unet"),
        "vae": str(out / "vae"),
        "scheduler": str(out / "scheduler"),
    }


def _write_diffusers(ckpt, out: Path) -> None:
    from safetensors.torch import save_file

    v = ckpt.config.vae
    if v.decoder_groups != v.norm_num_groups:
        raise InteropError(
            f"vae.decoder_norm_num_groups={v.decoder_norm_num_groups} differs from "
            f"vae.norm_num_groups={v.norm_num_groups}: a diffusers AutoencoderKL has one group "
            "count for encoder and decoder, so its folder would load another decoder"
        )
    unet = ckpt.model.unet
    sketch = unet._modules.pop("condition_sketch", None)  # a Pigeon module, not a diffusers one
    try:
        unet.save_pretrained(out / "unet", safe_serialization=True)
    finally:
        if sketch is not None:
            unet.condition_sketch = sketch
    u = ckpt.config.unet
    latent = ckpt.config.vae.latent_channels
    if sketch is not None:
        save_file(
            {k: v.contiguous() for k, v in sketch.state_dict().items()},
            out / "unet" / SKETCH_WEIGHTS,
        )
    channels = ["noisy latents"] + (["condition sketch"] if u.condition_sketch else [])
    channels += ["reference latents"] if u.reference_input else []
    write_atomic(
        out / "unet" / PIGEON_UNET,
        json.dumps(
            {
                "condition_sketch": u.condition_sketch,
                "reference_input": u.reference_input,
                "input_channels": [f"{c} ({latent})" for c in channels],
                "condition": "encoder_hidden_states: the condition adapter's prompt_embeds; "
                "added_cond_kwargs text_embeds: its pooled embeds, time_ids: (S, S, 0, 0, S, S)",
            },
            indent=2,
        )
        + "\n",
    )
    ckpt.model.vae.save_pretrained(out / "vae", safe_serialization=True)
    _diffusers_scheduler(ckpt.config.scheduler).save_pretrained(out / "scheduler")


def _diffusers_scheduler(config):
    """diffusers' DDIMScheduler on the same schedule (`pigeon.diffusion.scheduler` is checked
    against it), with our sampling defaults: no clipping, a_{-1} = 1."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        timestep_spacing=config.timestep_spacing,
        rescale_betas_zero_snr=config.zero_terminal_snr,
        clip_sample=False,
        set_alpha_to_one=True,
    )


def export_peft(checkpoint: str | Path, out: str | Path) -> dict:
    """OUT/base: the personalizer's LLM without LoRA as a transformers folder; OUT/adapter: its
    LoRA as a PEFT adapter (`PeftModel.from_pretrained(base, OUT/adapter)`). Token ids are Pigeon's
    vocabulary (the checkpoint's tokenizer + image codes + specials)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    ckpt = load_checkpoint(checkpoint)
    llm = ckpt.model.personalizer.llm
    base_state = {
        k.replace(".base_layer.", "."): v for k, v in llm.state_dict().items() if "lora_" not in k
    }
    base = LlamaForCausalLM(llm.config)
    base.load_state_dict(base_state, strict=True)
    lora_config = copy.deepcopy(llm.peft_config[ADAPTER])
    lora_config.base_model_name_or_path = "../base"
    lora_config.inference_mode = True
    adapter = {PEFT_PREFIX + k: v.contiguous() for k, v in get_peft_model_state_dict(llm).items()}
    with _new_folder(out) as staging:
        base.save_pretrained(staging / "base", safe_serialization=True)
        (staging / "adapter").mkdir()
        lora_config.save_pretrained(str(staging / "adapter"))
        save_file(adapter, staging / "adapter" / PEFT_WEIGHTS, metadata={"format": "pt"})
    out = Path(out)
    return {"out": str(out), "base": str(out / "base"), "adapter": str(out / "adapter")}
