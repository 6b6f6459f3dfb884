"""Module 2, the personalizer (the paper's module 2): a causal LLM that writes the personalized tokens.

The LLM is transformers' `LlamaForCausalLM` built from a config, with LoRA (peft) on q_proj and v_proj.
Its input embeddings are assembled here:

    e_t = E[input_ids_t] * embed_keep_t      masked history tokens -> zero vector, position kept
    e_t = A(reference_embedding)             at the single <emb> slot
    A   = Linear -> Dropout -> Linear -> Tanh -> Dropout     (reference adapter, no activation between)

The LoRA B matrices start at zero, so the injected adapters change nothing until stage 1 trains them.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from pigeon.config import PersonalizerConfig
from pigeon.vocab import PAD_ID, VocabLayout

LORA_TARGETS = ("q_proj", "v_proj")


class ReferenceAdapter(nn.Module):
    """Mean-pooled reference conditioning (batch, context_dim) -> the <emb> slot (batch, hidden)."""

    def __init__(self, context_dim: int, hidden: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(context_dim, hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
            nn.Tanh(),
            nn.Dropout(dropout),
        )

    def forward(self, reference_embedding: torch.Tensor) -> torch.Tensor:
        return self.net(reference_embedding)


class Personalizer(nn.Module):
    def __init__(self, config: PersonalizerConfig, vocab: VocabLayout, context_dim: int) -> None:
        super().__init__()
        self.config = config
        self.vocab = vocab
        llm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab.size,
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads,
                num_key_value_heads=config.num_heads,
                max_position_embeddings=config.max_positions,
                tie_word_embeddings=False,
                pad_token_id=PAD_ID,
                bos_token_id=vocab.img_start,
                eos_token_id=vocab.img_end,
            )
        )
        self.llm = inject_adapter_in_model(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=list(LORA_TARGETS),
                bias="none",
            ),
            llm,
        )
        self.reference_adapter = ReferenceAdapter(
            context_dim, config.adapter_hidden, config.hidden_size, config.adapter_dropout
        )

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings().weight.dtype

    def input_embeddings(self) -> nn.Embedding:
        return self.llm.get_input_embeddings()

    def embed(
        self, input_ids: torch.Tensor, embed_keep: torch.Tensor, reference_embedding: torch.Tensor
    ) -> torch.Tensor:
        """input_ids (batch, seq), embed_keep (batch, seq) float, reference_embedding (batch, ctx)
        -> inputs_embeds (batch, seq, hidden)."""
        embeds = self.input_embeddings()(input_ids) * embed_keep[..., None].to(self.dtype)
        slot = self.reference_adapter(reference_embedding)[:, None, :]  # (batch, 1, hidden)
        return torch.where((input_ids == self.vocab.emb)[..., None], slot, embeds)

    def transformer(
        self,
        input_ids: torch.Tensor,
        embed_keep: torch.Tensor,
        reference_embedding: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One prefill or decode step of the decoder stack.

        attention_mask: (batch, past_len + seq), 0 at left padding; position_ids: (batch, seq);
        past: per layer (key, value), each (batch, heads, past_len, head_dim), or None.
        Returns hidden states (batch, seq, hidden) and the updated per-layer (key, value).
        """
        out = self.llm.model(
            inputs_embeds=self.embed(input_ids, embed_keep, reference_embedding),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=DynamicCache(ddp_cache_data=past) if past else DynamicCache(),
            use_cache=True,
        )
        present = [(layer.keys, layer.values) for layer in out.cache.layers]
        return out.last_hidden_state, present

    def forward(
        self,
        input_ids: torch.Tensor,
        embed_keep: torch.Tensor,
        reference_embedding: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Like `transformer`, with logits over the whole vocabulary (batch, seq, vocab)."""
        hidden, present = self.transformer(
            input_ids, embed_keep, reference_embedding, attention_mask, position_ids, past
        )
        return self.llm.lm_head(hidden), present

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.llm.named_parameters() if "lora_" in n]

    def base_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.llm.named_parameters() if "lora_" not in n]
