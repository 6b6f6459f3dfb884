"""Prompt assembly for the personalizer, torch-free.

    "The user likes these images:" ("\n" history_run)*N "\nInstruction: " text " " <emb> "\nResponse: " <img>

A history run is the image's kept visual ids (no <img>/</img> around it, as the official scripts use);
tokens the mask generator dropped stay in place with embed_keep = 0 (zero embedding). <emb> is filled by
the reference adapter. In training the target run [v_1..v_n, </img>] follows <img> and carries the only
labels; everything else is IGNORE. The preamble is shorter than the paper's: a small LLM pays for every
token, and the template's job (marking history, instruction and response) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pigeon.vocab import PAD_ID, TextTokenizer, VocabLayout

IGNORE = -100
PREFIX = "The user likes these images:"
HISTORY_SEPARATOR = "\n"
INSTRUCTION = "\nInstruction: "
RESPONSE = "\nResponse: "


@dataclass
class Prompt:
    input_ids: np.ndarray  # (seq,) int64
    embed_keep: np.ndarray  # (seq,) float32
    labels: np.ndarray  # (seq,) int64, IGNORE except the target run
    # (seq,) int64: which history token (index into the concatenated history runs) a position holds,
    # -1 for text and specials; training uses it to place straight-through keep decisions
    keep_source: np.ndarray


@dataclass
class PromptBatch:
    input_ids: np.ndarray  # (batch, seq), left-padded
    embed_keep: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray  # pad-aware: 0 at the first real token
    labels: np.ndarray
    keep_source: np.ndarray  # -1 at padding


class PromptBuilder:
    def __init__(self, tokenizer: TextTokenizer, vocab: VocabLayout) -> None:
        self.vocab = vocab
        self.tokenizer = tokenizer
        self._fixed = {
            s: tokenizer.encode(s) for s in (PREFIX, HISTORY_SEPARATOR, INSTRUCTION, RESPONSE, " ")
        }

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def build(
        self,
        text: str,
        history_codes: list[np.ndarray],
        history_keep: list[np.ndarray],
        target_codes: np.ndarray | None = None,
    ) -> Prompt:
        """history_codes[i]: kept code ids of history image i; history_keep[i]: the mask generator's
        keep (1) / drop (0) decision for each of them; target_codes: the training target's codes."""
        ids: list[np.ndarray] = []
        keep: list[np.ndarray] = []
        source: list[np.ndarray] = []

        def add_text(segment: list[int]) -> None:
            ids.append(np.asarray(segment, dtype=np.int64))
            keep.append(np.ones(len(segment), dtype=np.float32))
            source.append(np.full(len(segment), -1, dtype=np.int64))

        add_text(self._fixed[PREFIX])
        offset = 0
        for codes, k in zip(history_codes, history_keep, strict=True):
            add_text(self._fixed[HISTORY_SEPARATOR])
            ids.append(np.asarray(codes, dtype=np.int64) + self.vocab.visual_offset)
            keep.append(np.asarray(k, dtype=np.float32))
            source.append(np.arange(offset, offset + len(codes), dtype=np.int64))
            offset += len(codes)
        add_text(self._fixed[INSTRUCTION] + self.text_ids(text))
        add_text(
            self._fixed[" "] + [self.vocab.emb] + self._fixed[RESPONSE] + [self.vocab.img_start]
        )
        input_ids = np.concatenate(ids)
        embed_keep = np.concatenate(keep)
        keep_source = np.concatenate(source)
        labels = np.full(len(input_ids), IGNORE, dtype=np.int64)
        if target_codes is not None:
            target = np.append(
                np.asarray(target_codes, dtype=np.int64) + self.vocab.visual_offset,
                self.vocab.img_end,
            )
            input_ids = np.concatenate([input_ids, target])
            embed_keep = np.concatenate([embed_keep, np.ones(len(target), dtype=np.float32)])
            # the logit at position j predicts token j+1; labels are stored unshifted as in HF
            labels = np.concatenate([labels, target])
            keep_source = np.concatenate([keep_source, np.full(len(target), -1, dtype=np.int64)])
        return Prompt(input_ids, embed_keep, labels, keep_source)

    def build_text_to_image(self, text: str, target_codes: np.ndarray) -> Prompt:
        """Stage 0c (base LMM): "Instruction: " text "\nResponse: " <img> v_1..v_n </img>."""
        prefix = np.asarray(
            self.tokenizer.encode(INSTRUCTION.lstrip("\n"))
            + self.text_ids(text)
            + self._fixed[RESPONSE]
            + [self.vocab.img_start],
            dtype=np.int64,
        )
        target = np.append(
            np.asarray(target_codes, dtype=np.int64) + self.vocab.visual_offset, self.vocab.img_end
        )
        input_ids = np.concatenate([prefix, target])
        labels = np.concatenate([np.full(len(prefix), IGNORE, dtype=np.int64), target])
        return Prompt(
            input_ids,
            np.ones(len(input_ids), np.float32),
            labels,
            np.full(len(input_ids), -1, dtype=np.int64),
        )


def left_pad(prompts: list[Prompt]) -> PromptBatch:
    """Left-pad to a batch; position ids count only real tokens (the official generation path)."""
    width = max(len(p.input_ids) for p in prompts)
    b = len(prompts)
    input_ids = np.full((b, width), PAD_ID, dtype=np.int64)
    embed_keep = np.zeros((b, width), dtype=np.float32)
    attention_mask = np.zeros((b, width), dtype=np.int64)
    labels = np.full((b, width), IGNORE, dtype=np.int64)
    keep_source = np.full((b, width), -1, dtype=np.int64)
    for i, p in enumerate(prompts):
        n = len(p.input_ids)
        input_ids[i, width - n :] = p.input_ids
        embed_keep[i, width - n :] = p.embed_keep
        attention_mask[i, width - n :] = 1
        labels[i, width - n :] = p.labels
        keep_source[i, width - n :] = p.keep_source
    position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)
    return PromptBatch(input_ids, embed_keep, attention_mask, position_ids, labels, keep_source)
