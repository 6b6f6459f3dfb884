"""Names, defaults and the `pigeon evaluate` flags, importable without torch or NumPy (the CLI
builds its parser from this on every command)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BASELINES = (
    "oracle",
    "style_vote_lookup",
    "reference_copy",
    "reference_recolour",
    "history_copy",
    "fixed_style",
    "mean_history",
)
MODEL_METHODS = (
    "lmm_no_history",
    "sft",
    "pigeon",
    "mask_off",
    "mask_random",
    "mask_frozen",
    "best_of_k",
)
ALL_METHODS = BASELINES + MODEL_METHODS
DEFAULT_RATIOS = (0.0, 0.25, 0.5, 0.75)
COPY_THRESHOLD = 0.02  # mean |difference| at 32 px below which an output is a copy


def add_arguments(p) -> None:
    """The `pigeon evaluate` flags (pigeon.cli adds the subcommand and calls `command`)."""
    p.add_argument(
        "--checkpoint",
        default=None,
        help="run folder (RUN/{lmm,sft,dpo}/best) or one checkpoint; none: baselines only",
    )
    p.add_argument(
        "--data",
        default=None,
        help="EmojiPrefs folder, 'procedural', or a user-data folder (items.jsonl + "
        "interactions.jsonl; the metrics without per-style ground truth) "
        "(default: the run's training data)",
    )
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help=f"default: all of {', '.join(ALL_METHODS)}",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--limit", type=int, default=None, help="first N users of the manifest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: checkpoint's)"
    )
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--sampler", choices=["ddim", "dpmpp_2m"], default=None)
    p.add_argument("--reference-mask-ratio", type=float, default=None)
    p.add_argument(
        "--request",
        action="append",
        metavar="KEY=VALUE",
        help="any other GenerationRequest field for model methods",
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="config override for every model method"
    )
    p.add_argument(
        "--checkpoint-for",
        action="append",
        metavar="METHOD=PATH",
        help="checkpoint of one model method (mask_frozen needs it)",
    )
    p.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=list(DEFAULT_RATIOS),
        help="best_of_k reference mask ratios",
    )
    p.add_argument("--batch", type=int, default=8, help="requests per pipeline call")
    p.add_argument("--metric-nets", default=str(WEIGHTS_DIR))
    p.add_argument("--no-enl0", action="store_true", help="skip the EfficientNet-Lite0 metrics")
    p.add_argument("--enl0-size", type=int, default=128)
    p.add_argument("--clip", default=None, help="local transformers CLIP folder")
    p.add_argument("--dinov2", default=None, help="local transformers DINOv2 folder")
    p.add_argument("--inception", default=None, help="FID Inception as ONNX")
    p.add_argument("--lpips", default=None, help="LPIPS as ONNX (two image inputs)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument(
        "--set-bootstrap",
        type=int,
        default=20,
        help="resamples for FD/KID intervals (each recomputes the statistic)",
    )
    p.add_argument("--no-robustness", action="store_true")
    p.add_argument("--robustness-users", type=int, default=200)
    p.add_argument(
        "--robustness-methods", nargs="+", default=["style_vote_lookup", "history_copy", "pigeon"]
    )
    p.add_argument("--noise-ratios", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6])
    p.add_argument("--history-lengths", type=int, nargs="+", default=[1, 3, 5, 10])
    p.add_argument("--grid-rows", type=int, default=8)
    p.add_argument("--copy-threshold", type=float, default=COPY_THRESHOLD)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument(
        "--chain",
        action="store_true",
        help="score the image chain of --checkpoint instead of the methods: ground truth, VAE "
        "round trip, the UNet given the target's / a history image's / generated tokens",
    )
    p.add_argument(
        "--chain-strengths",
        type=float,
        nargs="+",
        default=None,
        help="strengths of the token rows besides 1.0 and the checkpoint's",
    )
    p.add_argument(
        "--chain-links",
        nargs="+",
        default=None,
        metavar="LINK",
        help="default: all of ground_truth vae_round_trip target_tokens history_tokens generated",
    )


# key, label, higher is better, table, decimals
METRICS = (
    ("style_acc", "StyleAcc", True, "main", 3),
    ("style_margin", "StyleMargin", True, "main", 3),
    ("concept_r1", "ConceptR@1", True, "main", 3),
    ("concept_r5", "ConceptR@5", True, "main", 3),
    ("concept_mrr", "ConceptMRR", True, "main", 3),
    ("ssim", "SSIM", True, "main", 3),
    ("psnr", "PSNR", True, "main", 2),
    ("masked_l1", "maskedL1", False, "main", 3),
    ("lpips_enl0", "LPIPS-ENL0", False, "main", 3),
    ("fd_enl0", "FD-ENL0", False, "main", 2),
    ("kid_enl0", "KID-ENL0", False, "main", 4),
    ("copy_rate", "CopyRate", False, "main", 3),
    ("gt_sim_concept", "GT-sim", True, "more", 3),
    ("hist_sim_style", "Hist-sim", True, "more", 3),
    ("enl0_sim", "ENL0-sim", True, "more", 3),
    ("hist_ssim", "Hist-SSIM", True, "more", 3),
    ("fd_concept", "FD-Concept", False, "more", 3),
    ("kid_concept", "KID-Concept", False, "more", 4),
    ("fid", "FID", False, "pigeon", 2),
    ("clip_score", "CLIPScore", True, "pigeon", 2),
    ("clip_i", "CLIP-I", True, "pigeon", 3),
    ("dino_i", "DINO-I", True, "pigeon", 3),
    ("hist_clip_i", "Hist CLIP-I", True, "pigeon", 3),
    ("hist_clip_i_style", "Hist CLIP-I (s_u)", True, "pigeon", 3),
    ("hist_dino_i", "Hist DINO-I", True, "pigeon", 3),
    ("hist_dino_i_style", "Hist DINO-I (s_u)", True, "pigeon", 3),
    ("hist_lpips", "Hist LPIPS", False, "pigeon", 3),
)
