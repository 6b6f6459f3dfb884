"""The personalizer's vocabulary and the instruction-text tokenizer.

Layout (LaVIT's vocabulary, scaled): ids [0, V_text) are text, then <img>, </img>, <emb>, then one id
per visual code: visual_id = code + V_text + 3. The text tokenizer is a byte-level BPE from `tokenizers`
(any UTF-8 text encodes, nothing is unknown), trained on the dataset's texts and saved as
`tokenizer.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
PAD_ID = 0

# Built-in corpus: enough to give the BPE merges for the prompt template and common instructions
# before a dataset's own texts are available (`pigeon init`).
DEFAULT_CORPUS = (
    "The user likes these images:",
    "Instruction:",
    "Response:",
    "an emoji of a smiling face with heart eyes",
    "a sticker of a cat, a dog, a fox, a panda, a rabbit, a bear, a frog, a monkey",
    "a red apple, a green tree, a blue car, a yellow star, a purple flower, an orange fruit",
    "make it in my style, draw this for me, a happy face, a sad face, an angry face",
    "a house, a rocket, a heart, a hand waving, a thumbs up, a cake, a pizza, a cup of coffee",
)


@dataclass(frozen=True)
class VocabLayout:
    """Where each kind of id lives in the LLM vocabulary."""

    text_vocab_size: int
    codebook_size: int

    @property
    def img_start(self) -> int:
        return self.text_vocab_size

    @property
    def img_end(self) -> int:
        return self.text_vocab_size + 1

    @property
    def emb(self) -> int:
        return self.text_vocab_size + 2

    @property
    def visual_offset(self) -> int:
        return self.text_vocab_size + 3

    @property
    def size(self) -> int:
        return self.visual_offset + self.codebook_size

    def allowed_after_img(self) -> np.ndarray:
        """Boolean (size,) mask of the ids image generation may emit: visual codes and </img>."""
        allowed = np.zeros(self.size, dtype=bool)
        allowed[self.visual_offset :] = True
        allowed[self.img_end] = True
        return allowed


def vocab_layout(config) -> VocabLayout:
    """The layout for a `PipelineConfig`: text ids from the personalizer, codes from the tokenizer."""
    return VocabLayout(config.personalizer.text_vocab_size, config.history_encoder.codebook_size)


def train_text_tokenizer(texts: list[str] | tuple[str, ...], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with exactly `vocab_size` ids (padded with unused merges if the corpus is small)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TEXT_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    if tokenizer.get_vocab_size() > vocab_size:  # pragma: no cover - BpeTrainer respects the cap
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} ids, more than {vocab_size}")
    return tokenizer


class TextTokenizer:
    """Instruction text -> ids in [0, V_text), never BOS/EOS (as the official code: no BOS)."""

    def __init__(self, tokenizer: Tokenizer, text_vocab_size: int) -> None:
        if tokenizer.get_vocab_size() > text_vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.get_vocab_size()} ids but the personalizer reserves "
                f"text_vocab_size={text_vocab_size}"
            )
        self.tokenizer = tokenizer
        self.text_vocab_size = text_vocab_size

    @classmethod
    def load(cls, path: str | Path, text_vocab_size: int) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)), text_vocab_size)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
