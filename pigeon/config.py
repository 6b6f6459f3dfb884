"""Component configs: one frozen dataclass per component, strict JSON, presets and `--set` overrides.

Every config file carries `_class` and `_format`. Loading is strict: an unknown or a missing key is a
`ConfigError` that names the key and the file, never a silent default; the one exception is a field
marked `added_after_format` (added since the format was fixed), which files written before it may omit
and which then takes the behaviour those files were written with: its default, or its `when_omitted`
value where the default has changed since. Presets:

    tiny   seconds on a laptop CPU (tests, CI)
    small  EmojiPrefs at 64 px on a 2-core CPU
    base   GPU scale (256 px, a wide LLM, an SD-class UNet)

    >>> cfg = preset("tiny")
    >>> cfg.history_encoder.num_patches
    16
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pigeon.files import write_atomic

CONFIG_FORMAT = 1


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the value."""


# --------------------------------------------------------------------------------------------------
# Components


@dataclass(frozen=True, kw_only=True)
class HistoryEncoderConfig:
    """LaVIT-style dynamic visual tokenizer: ViT -> token selector -> token merger -> quantizer."""

    image_size: int = 32
    patch_size: int = 8
    vit_width: int = 32
    vit_layers: int = 1
    vit_heads: int = 2
    merger_layers: int = 1
    merger_heads: int = 2
    mlp_ratio: float = 4.0
    codebook_size: int = 64
    code_dim: int = 8
    # LaVIT samples the keep decision even at inference; serving needs a deterministic tokenizer (the
    # response cache keys on the history), so inference keeps a patch when p(keep) > 0.5 and training
    # samples with Gumbel noise when this is on.
    stochastic_selection: bool = True

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"history_encoder.image_size={self.image_size} is not a multiple of "
                f"patch_size={self.patch_size}"
            )
        _check_heads("history_encoder.vit", self.vit_width, self.vit_heads)
        _check_heads("history_encoder.merger", self.vit_width, self.merger_heads)

    @property
    def num_patches(self) -> int:
        """P: the number of visual tokens per image before selection."""
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True, kw_only=True)
class MaskGeneratorConfig:
    """Mutual mask generator (the paper's module 1): 1-layer encoder, cosine scores, Gumbel top-k."""

    num_layers: int = 1
    num_heads: int = 4
    ff_dim: int = 64
    embed_dropout: float = 0.2
    encoder_dropout: float = 0.1
    max_position: int = 257
    history_mask_ratio: float = 0.2
    # "straight_through": the paper's intent, keep decisions multiply the history embeddings so the LM
    # loss trains the generator. "frozen": the official code, where no gradient reaches it.
    training: Literal["straight_through", "frozen"] = "straight_through"
    # "mutual": scored Gumbel top-k; "random": uniform random reference masking, history unmasked;
    # "none": nothing masked (ablation switches of the official code).
    mask_type: Literal["mutual", "random", "none"] = "mutual"

    def __post_init__(self) -> None:
        if not 0.0 <= self.history_mask_ratio <= 1.0:
            raise ConfigError(
                f"mask_generator.history_mask_ratio={self.history_mask_ratio} is outside [0, 1]"
            )


@dataclass(frozen=True, kw_only=True)
class PersonalizerConfig:
    """Causal LLM (transformers Llama) over text | <img> | </img> | <emb> | visual codes, LoRA on q/v."""

    text_vocab_size: int = 320
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 64
    max_positions: int = 512
    lora_rank: int = 4
    lora_alpha: int = 8
    lora_dropout: float = 0.05
    adapter_hidden: int = 16
    adapter_dropout: float = 0.2
    max_history: int = 5

    def __post_init__(self) -> None:
        _check_heads("personalizer", self.hidden_size, self.num_heads)
        if self.text_vocab_size < 260:
            raise ConfigError(
                f"personalizer.text_vocab_size={self.text_vocab_size} must be >= 260 "
                "(256 byte-level symbols + 4 special tokens)"
            )
        if self.max_history < 1:
            raise ConfigError(f"personalizer.max_history={self.max_history} must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ConditionAdapterConfig:
    """LaVIT token decoder: learned queries cross-attend to visual tokens -> UNet conditioning."""

    width: int = 32
    num_layers: int = 1
    num_heads: int = 2
    num_queries: int = 8
    context_dim: int = 32
    pooled_dim: int = 16
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _check_heads("condition_adapter", self.width, self.num_heads)


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """diffusers UNet2DConditionModel with SDXL-style added conditioning (text_time)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8  # the width of every attention head; a block has ch // it heads
    addition_time_embed_dim: int = 8
    norm_num_groups: int = 8
    # "width": attention_head_dim is each head's width. "count": it is handed to diffusers as is,
    # which reads it as the number of heads of every block (heads of width ch // attention_head_dim:
    # 4 at `small`); checkpoints written before this field were built that way and keep it.
    attention_head_layout: Literal["width", "count"] = field(
        default="width", metadata={"added_after_format": 1, "when_omitted": "count"}
    )
    # The reference image's VAE latents concatenated to the noisy latents as extra input channels
    # (InstructPix2Pix): reference and target are near pixel-aligned, so the concept arrives
    # spatially and the tokens only need to carry the style. The `decoder` training stage turns it on
    # (zero-initialised channels) and trains the UNet alone, so a model fresh from a preset has it off.
    reference_input: bool = field(default=False, metadata={"added_after_format": 1})
    # The condition drawn as latents by a linear map of prompt_embeds (pigeon.models.unet
    # .ConditionSketch), concatenated as input channels: the tokens' spatial route into the UNet. The
    # image stage trains it to reconstruct the image's latents. Files written before it: off.
    condition_sketch: bool = field(
        default=True, metadata={"added_after_format": 1, "when_omitted": False}
    )
    # transformer layers in each cross-attention block (and the middle block: the last entry), as
    # diffusers' `transformer_layers_per_block` for the blocks after the plain first one; () = one
    # each. SDXL: (1, 2, 10) over (320, 640, 1280), the first block's entry unused
    transformer_layers_per_block: tuple[int, ...] = field(
        default=(), metadata={"added_after_format": 1}
    )
    # the transformer blocks' input and output projections as linear layers (SD 2, SDXL) rather than
    # 1x1 convolutions (SD 1.5): the same map, stored in another tensor shape
    use_linear_projection: bool = field(default=False, metadata={"added_after_format": 1})

    def __post_init__(self) -> None:
        layers = self.transformer_layers_per_block
        if layers and (len(layers) != len(self.block_out_channels) or min(layers) < 1):
            raise ConfigError(
                f"unet.transformer_layers_per_block={list(layers)} must give one count >= 1 per "
                f"block of block_out_channels={list(self.block_out_channels)} (or be empty)"
            )
        _check_groups("unet", "norm_num_groups", self.block_out_channels, self.norm_num_groups)
        for ch in self.block_out_channels:
            if self.attention_head_layout == "width" and ch % self.attention_head_dim:
                raise ConfigError(
                    f"unet.block_out_channels has {ch}, not a multiple of "
                    f"attention_head_dim={self.attention_head_dim} (the head width)"
                )

    @property
    def attention_heads(self) -> tuple[int, ...]:
        """Heads per block, as diffusers' `attention_head_dim` argument takes them (it is read as
        the head count when `num_attention_heads` is absent, as in SD 1.5's config)."""
        if self.attention_head_layout == "count":
            return (self.attention_head_dim,) * len(self.block_out_channels)
        return tuple(ch // self.attention_head_dim for ch in self.block_out_channels)


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """diffusers AutoencoderKL; the image is downsampled by 2**(len(block_out_channels)-1)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    scaling_factor: float = 1.0
    # GroupNorm groups of the decoder alone (0 = norm_num_groups). A group of one channel is an
    # instance norm, which removes every feature map's own mean and spread over the image: the
    # decoder's last norm, right before its output convolution, then leaves the colour of a
    # flat-colour sticker to be guessed (the committed `small` checkpoint's VAE turned yellow faces
    # orange and green frogs brown). Groups of 4 channels or more, as SD's VAE has, keep the ratios
    # between a group's channels. The parameters do not change shape, so a decoder can be retrained
    # with new groups on the frozen encoder's latents.
    decoder_norm_num_groups: int = field(default=0, metadata={"added_after_format": 1})

    def __post_init__(self) -> None:
        _check_groups("vae", "norm_num_groups", self.block_out_channels, self.norm_num_groups)
        _check_groups(
            "vae", "decoder_norm_num_groups", self.block_out_channels, self.decoder_groups
        )

    @property
    def decoder_groups(self) -> int:
        return self.decoder_norm_num_groups or self.norm_num_groups

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# how the image-to-image start is recoloured from the history (`pigeon.core.style_start`)
StyleStart = Literal["none", "moments", "histogram"]
STYLE_STARTS: tuple[str, ...] = typing.get_args(StyleStart)


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Noise schedule and sampler defaults (DDIM, or the DPM-Solver++(2M) multistep solver)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    timestep_spacing: Literal["leading", "trailing"] = "leading"
    # Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed": rescale the
    # betas so that the last timestep is pure noise (a_T = 0). Without it a_T is about 0.005: the
    # UNet learns to read the image's mean colour off its noisiest inputs, and from serving's pure
    # noise it draws pale colours. Pure noise carries no x0, so it needs v-prediction.
    zero_terminal_snr: bool = field(default=False, metadata={"added_after_format": 1})
    sampler: Literal["ddim", "dpmpp_2m"] = "ddim"
    num_inference_steps: int = 4
    guidance_scale: float = 7.0
    # 1.0 starts from pure noise (the paper). Below 1, denoising starts from the reference image's
    # latents noised to timestep ~strength*T (SDEdit / diffusers' img2img `strength`): the reference's
    # layout and colours survive, and the steps left change the style.
    strength: float = field(default=1.0, metadata={"added_after_format": 1})
    # Below strength 1: recolour the reference's foreground from the user's history before it is
    # noised (`pigeon.core.style_start`: "moments" or "histogram"), so the start carries the
    # history's palette; "none" starts from the reference as it is.
    style_start: StyleStart = field(default="none", metadata={"added_after_format": 1})

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"scheduler.strength={self.strength} must be in (0, 1]")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ConfigError(
                f"scheduler.zero_terminal_snr=true needs scheduler.prediction_type=v_prediction "
                f"(got {self.prediction_type!r}): at a_T = 0 the noise alone says nothing of x0"
            )


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How the personalizer decodes visual tokens (the official code's generation settings)."""

    strategy: Literal["greedy", "top_k", "beam"] = "greedy"
    top_k: int = 50
    num_beams: int = 4
    temperature: float = 1.0
    min_new_tokens: int = 1
    reference_mask_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"generation.temperature={self.temperature} must be > 0")
        if self.top_k < 1 or self.num_beams < 1 or self.min_new_tokens < 0:
            raise ConfigError(
                f"generation top_k={self.top_k}, num_beams={self.num_beams}, "
                f"min_new_tokens={self.min_new_tokens} must be positive"
            )


# The weight-carrying components of a PipelineConfig, in the order checkpoints store them
# (pigeon.checkpoint) and PigeonModel lists them (pigeon.models.pigeon).
COMPONENT_MODULES = (
    "history_encoder",
    "mask_generator",
    "personalizer",
    "condition_adapter",
    "unet",
    "vae",
)


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The whole model: one config per component plus the output resolution."""

    preset: str = "tiny"
    image_size: int = 32
    history_encoder: HistoryEncoderConfig = field(default_factory=HistoryEncoderConfig)
    mask_generator: MaskGeneratorConfig = field(default_factory=MaskGeneratorConfig)
    personalizer: PersonalizerConfig = field(default_factory=PersonalizerConfig)
    condition_adapter: ConditionAdapterConfig = field(default_factory=ConditionAdapterConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self) -> None:
        if self.image_size % self.vae.downsample:
            raise ConfigError(
                f"image_size={self.image_size} is not a multiple of the VAE downsampling "
                f"{self.vae.downsample}"
            )
        _check_heads("mask_generator", self.personalizer.hidden_size, self.mask_generator.num_heads)
        # positions are 1..n within an image (0 = pad); the official code's reference run carries two
        # extra specials and overflows its 257-row table at 255+ kept patches; ours carries none
        if self.history_encoder.num_patches + 1 > self.mask_generator.max_position:
            raise ConfigError(
                f"mask_generator.max_position={self.mask_generator.max_position} is smaller than "
                f"num_patches+1={self.history_encoder.num_patches + 1}"
            )

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample


MAX_IN_FLIGHT = 1024  # the most requests ServingConfig.max_in_flight may admit at once
_ADDED = {"added_after_format": 1}  # ServingConfig fields that older serving.json files may omit


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """How the Triton model repository serves a checkpoint (`serving.json`; not part of a checkpoint)."""

    max_batch_size: int = 8  # per component model; the declared batch maximum caps it
    max_queue_size: int = 64  # requests waiting per model before Triton rejects new ones
    instances: int = 1  # execution instances of every model but the UNet and the BLS loops
    # personalize and denoise run one request per instance for its whole loop; several instances let
    # concurrent users' UNet steps meet in the UNet's dynamic batcher
    bls_instances: int = 4
    unet_instances: int = 1
    unet_dynamic_batching: bool = True  # merge concurrent requests' UNet steps into one execution
    unet_batch_delay_us: int = 2000
    history_cache: bool = True  # Triton response cache on history_encoder: returning users
    ort_threads: int = 2  # ONNX Runtime intra-op threads per model instance (cpu target): cores
    # the personalizer's own count: a decode step (one token through a small transformer) is too
    # little work to split, and waking a second thread for each of its 64 steps costs more than it
    # saves (benchmarks/README.md, "The fast variant"). 0: ort_threads, as a serving.json written
    # before this field served
    ort_personalizer_threads: int = field(default=1, metadata={**_ADDED, "when_omitted": 0})
    # cpu target: personalize runs the personalizer's ONNX file itself instead of one BLS call per
    # generated token (each call ships the whole KV cache between processes); the file is the same
    # version's, hash-checked. The gpu target always calls the TensorRT personalizer through BLS.
    personalizer_in_process: bool = True
    # cpu target: denoise runs the UNet's ONNX file itself instead of two BLS calls' worth of copies
    # per step; concurrent users' steps then no longer meet in the UNet's dynamic batcher. On by
    # default: four serving benchmark runs on the 2-core CPU measured higher throughput with it
    # (benchmarks/README.md). A serving.json written before it existed keeps serving as it did.
    unet_in_process: bool = field(default=True, metadata={**_ADDED, "when_omitted": False})
    # ONNX Runtime session settings, for the Triton models (config.pbtxt parameters) and the in-process
    # runner alike (pigeon.inference.runners.OrtOptions.from_serving); ort_threads is the intra-op count
    ort_inter_op_threads: int = field(default=1, metadata=_ADDED)  # used by execution mode parallel
    ort_graph_optimization: Literal["disable", "basic", "extended", "all"] = field(
        default="all", metadata=_ADDED
    )
    ort_execution_mode: Literal["sequential", "parallel"] = field(
        default="sequential", metadata=_ADDED
    )
    ort_allow_spinning: bool = field(default=False, metadata=_ADDED)
    # in process: the denoise loop's UNet runs through an IOBinding, outputs into buffers allocated
    # once and reused every step
    ort_io_binding: bool = field(default=False, metadata=_ADDED)
    # in process: one ONNX Runtime session per (file, settings), shared by every runner built from it
    ort_session_reuse: bool = field(default=True, metadata=_ADDED)
    # Backpressure: requests waiting for a personalize or denoise instance (each runs one request's
    # whole loop) beyond this many are refused at once with UNAVAILABLE (gRPC) / 503 (HTTP), rather
    # than queued behind work that cannot finish in time; 0 = no bound. A request's wait is about
    # this many over the server's throughput: size it to the latency promised
    request_queue_size: int = field(default=32, metadata=_ADDED)
    # a request that waited this long for a personalize or denoise instance is refused the same way
    # (a client may ask for a shorter wait with its request timeout); 0 = no limit
    request_queue_timeout_ms: int = field(default=0, metadata=_ADDED)
    # Admission (pigeon.serving.in_flight): at most this many requests between preprocess and the end
    # of denoise, counted across every loop instance; preprocess refuses the rest at once with
    # UNAVAILABLE / 503. An admitted request then runs as it would unloaded instead of waiting behind
    # one request per loop while both loops share the cores; the price is the overlap of one
    # request's personalizer with another's denoising. 0 = no limit
    max_in_flight: int = field(default=0, metadata=_ADDED)
    # a slot whose request vanished without giving it back (a killed process, a queue refusal) frees
    # itself after this long; a request's own timeout_ms replaces it
    in_flight_lease_ms: int = field(default=60_000, metadata=_ADDED)

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_queue_size",
            "instances",
            "bls_instances",
            "unet_instances",
            "ort_threads",
            "ort_inter_op_threads",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"serving.{name}={getattr(self, name)} must be >= 1")
        for name in ("request_queue_size", "request_queue_timeout_ms", "ort_personalizer_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"serving.{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.max_in_flight <= MAX_IN_FLIGHT:
            raise ConfigError(
                f"serving.max_in_flight={self.max_in_flight} must be in [0, {MAX_IN_FLIGHT}]"
            )
        if self.in_flight_lease_ms < 1:
            raise ConfigError(f"serving.in_flight_lease_ms={self.in_flight_lease_ms} must be >= 1")


def _check_heads(name: str, width: int, heads: int) -> None:
    if heads < 1 or width % heads:
        raise ConfigError(f"{name}: width {width} is not divisible by num_heads={heads}")


def _check_groups(component: str, name: str, channels: tuple[int, ...], groups: int) -> None:
    bad = [ch for ch in channels if groups < 1 or ch % groups]
    if bad:
        raise ConfigError(
            f"{component}.{name}={groups} does not divide {component}.block_out_channels "
            f"entries {bad}"
        )


# --------------------------------------------------------------------------------------------------
# Presets


def _tiny() -> PipelineConfig:
    return PipelineConfig()


def _small() -> PipelineConfig:
    return PipelineConfig(
        preset="small",
        image_size=64,
        history_encoder=HistoryEncoderConfig(
            image_size=64,
            patch_size=8,
            vit_width=128,
            vit_layers=4,
            vit_heads=4,
            merger_layers=2,
            merger_heads=4,
            codebook_size=1024,
            code_dim=16,
        ),
        mask_generator=MaskGeneratorConfig(num_heads=4, ff_dim=512),
        personalizer=PersonalizerConfig(
            text_vocab_size=1024,
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            intermediate_size=1024,
            max_positions=1024,
            lora_rank=8,
            lora_alpha=16,
            adapter_hidden=128,
        ),
        condition_adapter=ConditionAdapterConfig(
            width=128, num_layers=2, num_heads=4, num_queries=16, context_dim=128, pooled_dim=64
        ),
        unet=UNetConfig(
            block_out_channels=(64, 128, 128),
            layers_per_block=1,
            attention_head_dim=32,
            addition_time_embed_dim=16,
            norm_num_groups=32,
        ),
        # groups of 4+ channels, as SD's VAE: 32 groups over the 32-channel blocks were instance
        # norms, which lose a flat region's colour (docs/RESULTS.md §15)
        vae=VAEConfig(block_out_channels=(32, 64, 128), latent_channels=4, norm_num_groups=8),
        scheduler=SchedulerConfig(num_inference_steps=25, guidance_scale=7.0),
    )


def _base() -> PipelineConfig:
    return PipelineConfig(
        preset="base",
        image_size=256,
        history_encoder=HistoryEncoderConfig(
            image_size=224,
            patch_size=14,
            vit_width=768,
            vit_layers=12,
            vit_heads=12,
            merger_layers=6,
            merger_heads=12,
            codebook_size=16384,
            code_dim=32,
        ),
        mask_generator=MaskGeneratorConfig(num_heads=4, ff_dim=2048),
        personalizer=PersonalizerConfig(
            text_vocab_size=32000,
            hidden_size=2048,
            num_layers=16,
            num_heads=16,
            intermediate_size=5632,
            max_positions=4096,
            lora_rank=8,
            lora_alpha=16,
            adapter_hidden=512,
        ),
        # the widths of SDXL's text encoders (cross-attention 2048, pooled 1280), so that an SDXL
        # UNet and VAE load into this preset without surgery (`pigeon checkpoint import`)
        condition_adapter=ConditionAdapterConfig(
            width=768, num_layers=6, num_heads=12, num_queries=77, context_dim=2048, pooled_dim=1280
        ),
        unet=UNetConfig(  # SDXL's UNet layout
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            attention_head_dim=64,
            addition_time_embed_dim=256,
            norm_num_groups=32,
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
        ),
        vae=VAEConfig(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            scaling_factor=0.13025,
        ),
        scheduler=SchedulerConfig(num_inference_steps=25, guidance_scale=7.0),
    )


PRESETS = {"tiny": _tiny, "small": _small, "base": _base}


def preset(name: str) -> PipelineConfig:
    """The named preset; an unknown name is an error listing the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------------------------------
# Strict (de)serialisation


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict with `_class` and `_format` headers (nested configs carry none)."""
    return {"_class": type(config).__name__, "_format": CONFIG_FORMAT, **_plain(config)}


def _plain(config: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = (
            _plain(value)
            if dataclasses.is_dataclass(value)
            else (list(value) if isinstance(value, tuple) else value)
        )
    return out


def from_dict(cls: type, data: dict[str, Any], *, where: str = "config") -> Any:
    """Build `cls` from `data`; every field must be present (but those added after the format) and no
    other key may be."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    if "_class" in data:
        if data.pop("_class") != cls.__name__:
            raise ConfigError(f"{where}: _class is not {cls.__name__}")
    if "_format" in data:
        fmt = data.pop("_format")
        if fmt != CONFIG_FORMAT:
            raise ConfigError(
                f"{where}: _format={fmt!r} is not supported (expected {CONFIG_FORMAT})"
            )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} for {cls.__name__}")
    added_later = {f.name for f in dataclasses.fields(cls) if "added_after_format" in f.metadata}
    missing = sorted(names - set(data) - added_later)
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r} for {cls.__name__}")
    kwargs = {
        name: _coerce(hints[name], data[name], f"{where}.{name}") for name in names if name in data
    }
    for f in dataclasses.fields(cls):  # omitted, and its default has changed since: the old one
        if f.name not in data and "when_omitted" in f.metadata:
            kwargs[f.name] = f.metadata["when_omitted"]
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a value the dataclass refuses: say which file it came from
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"{where}: {exc}") from exc


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotated type `tp` (bool, int, float, str, Literal, tuple, nested)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}={value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def save_json(config: Any, path: str | Path) -> None:
    """Write `config` as JSON atomically (written aside, then renamed)."""
    write_atomic(path, json.dumps(to_dict(config), indent=2) + "\n")


def load_json(cls: type, path: str | Path) -> Any:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return from_dict(cls, data, where=str(path))


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Apply `key.sub=value` strings (JSON values, or bare strings) with the same strict checks."""
    data = _plain(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {key!r}: unknown key {part!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {key!r}: unknown key {parts[-1]!r}")
        node[parts[-1]] = value
    return from_dict(type(config), data, where="override")
