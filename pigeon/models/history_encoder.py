"""History encoder: the LaVIT-style dynamic visual tokenizer.

    images (batch, 3, S, S), CLIP-normalised
      -> ViT (transformers CLIPVisionModel from a config), CLS dropped      (batch, P, D)
      -> token selector: keep probability per patch, Gumbel in training     (batch, P)
      -> token merger: causal self-attention over kept patches, cross-attention to dropped ones
      -> quantizer: Linear-Tanh-Linear, L2-normalised, nearest code         (batch, P) code ids
         (training restarts dead codes on encoder outputs, so the codebook cannot collapse)

Tokens stay at their patch position with a keep flag rather than being compacted, so every tensor has a
static shape; consumers read the kept tokens in raster order (as LaVIT's official code orders them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from pigeon.config import HistoryEncoderConfig
from pigeon.models.layers import MLP

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TokenSelector(nn.Module):
    """LaVIT TokenPredictor: local half + mean-pooled global half -> MLP -> log p(keep), log p(drop)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        local, glob = x.chunk(2, dim=-1)
        glob = glob.mean(dim=1, keepdim=True).expand_as(glob)
        return F.log_softmax(self.out(torch.cat([local, glob], dim=-1)), dim=-1)  # (batch, P, 2)


class PolicyAttention(nn.Module):
    """Attention whose keys are weighted by a (straight-through) keep policy, as in DynamicViT/LaVIT:
    a_ij = exp(s_ij) w_ij / sum_k exp(s_ik) w_ik, so gradients reach the selector through w."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (batch, n, D), context (batch, m, D), weight (batch, n, m) in [0, 1]."""
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)  # (batch, heads, n, head_dim)
        k, v = self.kv(context).chunk(2, dim=-1)
        k = k.view(b, -1, h, d // h).transpose(1, 2)
        v = v.view(b, -1, h, d // h).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5  # (batch, heads, n, m)
        scores = scores - scores.amax(dim=-1, keepdim=True).detach()
        attn = scores.exp() * weight[:, None]
        attn = attn / (attn.sum(dim=-1, keepdim=True) + 1e-6)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class CausalFuserBlock(nn.Module):
    """Token merger block: causal self-attention among kept tokens, cross-attention to the dropped
    tokens' raw features (plus one learned null key, so an image that keeps everything still works)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = PolicyAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = PolicyAttention(dim, num_heads)
        self.null_key = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, dropped: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (batch, P, D) tokens, dropped (batch, P, D) LN'd ViT features, keep (batch, P) policy."""
        b, p, _ = x.shape
        causal = torch.tril(torch.ones(p, p, dtype=x.dtype, device=x.device))
        eye = torch.eye(p, dtype=x.dtype, device=x.device)
        # a query always sees itself, so a row is never empty
        self_weight = causal * keep[:, None, :] * (1 - eye) + eye  # (batch, P, P)
        x = x + self.self_attn(self.norm1(x), self.norm1(x), self_weight)
        context = torch.cat([self.null_key.expand(b, 1, -1), dropped], dim=1)  # (batch, 1+P, D)
        cross_weight = torch.cat([torch.ones_like(keep[:, :1]), 1 - keep], dim=1)
        x = x + self.cross_attn(
            self.norm2(x), context, cross_weight[:, None, :].expand(b, p, p + 1)
        )
        return x + self.mlp(self.norm3(x))


class Quantizer(nn.Module):
    """encode_task_layer -> L2-normalise -> nearest entry of an L2-normalised codebook.

    Training keeps the codebook alive (`restart_dead_codes`): a code whose share of the kept tokens
    (an exponential moving average, `usage`) falls far below uniform is moved onto a random encoder
    output of the current batch, as in Jukebox and vector-quantize-pytorch. Without it the small
    recipe's tokenizer collapsed onto one code and the tokens carried nothing.
    """

    def __init__(self, dim: int, code_dim: int, codebook_size: int) -> None:
        super().__init__()
        self.encode = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, code_dim))
        self.codebook = nn.Embedding(codebook_size, code_dim)
        nn.init.normal_(self.codebook.weight)
        # share of kept tokens per code (EMA); training state only, starts uniform (every code alive)
        self.register_buffer(
            "usage", torch.full((codebook_size,), 1.0 / codebook_size), persistent=False
        )

    def code_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...,) -> unit code vectors (..., code_dim). Also used by the condition adapter."""
        return F.normalize(self.codebook(ids), dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, P, D) -> ids (batch, P), z (encoder output), z_q (nearest code, unit norm)."""
        z = F.normalize(self.encode(x), dim=-1)
        codebook = F.normalize(self.codebook.weight, dim=-1)
        ids = (z @ codebook.t()).argmax(dim=-1)  # cosine = L2 nearest on the unit sphere
        return ids, z, codebook[ids]

    @torch.no_grad()
    def restart_dead_codes(
        self,
        ids: torch.Tensor,
        z: torch.Tensor,
        keep: torch.Tensor,
        decay: float = 0.9,
        dead_share: float = 0.05,
    ) -> int:
        """Update `usage` with this batch's kept tokens, then move every code used less than
        dead_share x uniform onto a random kept encoder output. Returns how many codes moved.
        It edits the codebook in place: call it outside a forward pass whose backward is pending.

        ids (batch, P), z (batch, P, code_dim), keep (batch, P) hard 0/1."""
        kept = keep.reshape(-1) > 0.5
        size = self.usage.numel()
        moved = 0
        if kept.any():  # always, in practice: the selector keeps at least one patch per image
            counts = torch.bincount(ids.reshape(-1)[kept], minlength=size).to(self.usage)
            self.usage.mul_(decay).add_(counts / counts.sum(), alpha=1 - decay)
            dead = (self.usage < dead_share / size).nonzero().squeeze(1)
            moved = int(dead.numel())
            if moved:
                pool = z.reshape(-1, z.shape[-1])[kept]
                pick = torch.randint(0, pool.shape[0], (moved,), device=pool.device)
                noise = 0.01 * torch.randn(moved, pool.shape[1], device=pool.device)
                self.codebook.weight[dead] = (pool[pick] + noise).to(self.codebook.weight.dtype)
                self.usage[dead] = 1.0 / size  # a grace period before it can be judged dead again
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank takes rank 0's codebook, on every call (a collective all ranks must join)
            torch.distributed.broadcast(self.codebook.weight, 0)
            torch.distributed.broadcast(self.usage, 0)
        return moved


def code_perplexity(ids: torch.Tensor, keep: torch.Tensor, codebook_size: int) -> float:
    """exp(entropy) of the code distribution over kept tokens: 1 when every token has the same code,
    codebook_size when all are used equally."""
    counts = torch.bincount(ids.reshape(-1)[keep.reshape(-1) > 0.5], minlength=codebook_size)
    if counts.sum() == 0:
        return 0.0
    p = counts.double() / counts.sum()
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


@dataclass
class TokenizerOutput:
    token_ids: torch.Tensor  # (batch, P) int64 code ids
    token_keep: torch.Tensor  # (batch, P) keep policy, hard 0/1 (straight-through in training)
    keep_prob: torch.Tensor  # (batch, P) p(keep) from the selector
    quantized: torch.Tensor  # (batch, P, code_dim) straight-through code vectors
    commit_loss: torch.Tensor  # scalar: codebook + 0.25 * commitment (VQ-VAE)
    encoded: torch.Tensor  # (batch, P, code_dim) unit encoder outputs z, before quantization


class HistoryEncoder(nn.Module):
    def __init__(self, config: HistoryEncoderConfig) -> None:
        super().__init__()
        self.config = config
        d = config.vit_width
        self.vit = CLIPVisionModel(
            CLIPVisionConfig(
                image_size=config.image_size,
                patch_size=config.patch_size,
                hidden_size=d,
                num_hidden_layers=config.vit_layers,
                num_attention_heads=config.vit_heads,
                intermediate_size=int(d * config.mlp_ratio),
                num_channels=3,
            )
        )
        self.selector = TokenSelector(d)
        self.dropped_norm = nn.LayerNorm(d)
        self.merger = nn.ModuleList(
            CausalFuserBlock(d, config.merger_heads, config.mlp_ratio)
            for _ in range(config.merger_layers)
        )
        self.merger_norm = nn.LayerNorm(d)
        self.quantizer = Quantizer(d, config.code_dim, config.codebook_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1] (batch, 3, S, S) -> CLIP-normalised."""
        return (images - self.mean) / self.std

    def select(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Keep policy (batch, P): Gumbel hard sample in training, p(keep) > 0.5 otherwise. The most
        likely patch is always kept, so no image is ever empty."""
        if self.training and self.config.stochastic_selection:
            keep = F.gumbel_softmax(log_probs, hard=True)[..., 0]
        else:
            soft = log_probs[..., 0].exp()
            keep = (log_probs[..., 0] > log_probs[..., 1]).to(soft.dtype)
            keep = keep - soft.detach() + soft  # straight-through, for frozen-eval gradients
        best = F.one_hot(log_probs[..., 0].argmax(dim=-1), log_probs.shape[1]).to(keep.dtype)
        return keep + (1 - keep.detach()) * best

    def tokenize(self, images: torch.Tensor) -> TokenizerOutput:
        """images in [0, 1], (batch, 3, S, S) -> TokenizerOutput."""
        features = self.vit(pixel_values=self.normalize(images)).last_hidden_state[
            :, 1:
        ]  # (b, P, D)
        log_probs = self.selector(features)
        keep = self.select(log_probs)
        dropped = self.dropped_norm(features)
        x = features
        for block in self.merger:
            x = block(x, dropped, keep)
        ids, z, z_q = self.quantizer(self.merger_norm(x))
        mask = keep.detach()[..., None]
        denom = mask.sum().clamp_min(1.0) * z.shape[-1]
        codebook_loss = (((z_q - z.detach()) ** 2) * mask).sum() / denom
        commitment = (((z - z_q.detach()) ** 2) * mask).sum() / denom
        return TokenizerOutput(
            token_ids=ids,
            token_keep=keep,
            keep_prob=log_probs[..., 0].exp(),
            quantized=z + (z_q - z).detach(),
            commit_loss=codebook_loss + 0.25 * commitment,
            encoded=z,
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images in [0, 1] -> token_ids (batch, P) int64, token_keep (batch, P) int64."""
        out = self.tokenize(images)
        return out.token_ids, (out.token_keep > 0.5).long()
