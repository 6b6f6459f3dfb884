"""Blocks shared by more than one component: attention, MLP, sinusoid table."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention on SDPA (the fused kernel where the backend has one).

    `key_keep` (batch, keys) is 1 where a key may be attended to; rows with no key left are guarded by
    the caller (every use here adds an always-visible null key).
    """

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_keep: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)  # (batch, heads, n, head_dim)
        k, v = self.kv(context).chunk(2, dim=-1)
        k = k.view(b, -1, h, d // h).transpose(1, 2)  # (batch, heads, keys, head_dim)
        v = v.view(b, -1, h, d // h).transpose(1, 2)
        mask = None
        if key_keep is not None:
            # (batch, 1, n, keys): ONNX Attention on CPU does not broadcast the mask over queries
            mask = key_keep.bool()[:, None, None, :].expand(b, 1, n, key_keep.shape[1])
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """Post-norm Transformer encoder layer with ReLU, the semantics of `nn.TransformerEncoderLayer`
    (the official mask generator's), written on `Attention` so that it exports with dynamic shapes:
    x = LN1(x + Dropout(SelfAttn(x))); x = LN2(x + Dropout(W2 Dropout(ReLU(W1 x))))."""

    def __init__(self, dim: int, num_heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_keep: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x, key_keep=key_keep)))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(ff))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """The fixed Transformer position table PE[pos, 2i] = sin(pos / 10000^(2i/dim)), (length, dim)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div[: dim // 2])
    return table
