"""Autoregressive generation of visual tokens after <img>, torch-free.

The personalizer component returns logits over [</img>, code_0 .. code_{K-1}] only, so text ids are
suppressed by construction. Generation stops at </img> or after `max_codes` codes (the official code
truncates to the tokenizer's P). Strategies: greedy, top-k sampling, beam search; every random choice
draws from the request's own generator, so a request's result does not depend on its batch. A
request's `Deadline` is checked before every step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pigeon.config import GenerationConfig
from pigeon.core.deadline import NO_DEADLINE, Deadline
from pigeon.core.prompt import PromptBatch
from pigeon.vocab import VocabLayout

StepFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
END = 0  # column of </img> in visual_logits


class Decoder:
    def __init__(
        self, step: StepFn, vocab: VocabLayout, num_layers: int, num_heads: int, head_dim: int
    ) -> None:
        self.step = step
        self.vocab = vocab
        self.num_layers = num_layers
        self.kv_shape = (num_heads, head_dim)

    def _feeds(
        self,
        input_ids,
        embed_keep,
        reference_embedding,
        attention_mask,
        position_ids,
        past: list[np.ndarray],
    ) -> dict[str, np.ndarray]:
        feeds = {
            "input_ids": input_ids,
            "embed_keep": embed_keep,
            "reference_embedding": reference_embedding,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        for i in range(self.num_layers):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = past[2 * i], past[2 * i + 1]
        return feeds

    def _run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.step(feeds)
        present = []
        for i in range(self.num_layers):
            present += [out[f"present_key_{i}"], out[f"present_value_{i}"]]
        return out["visual_logits"].astype(np.float64), present

    def _next_feeds(
        self,
        columns: np.ndarray,
        reference_embedding: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[np.ndarray],
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        token = np.where(columns == END, self.vocab.img_end, columns - 1 + self.vocab.visual_offset)
        b = len(columns)
        attention_mask = np.concatenate([attention_mask, np.ones((b, 1), np.int64)], axis=1)
        position_ids = position_ids[:, -1:] + 1
        feeds = self._feeds(
            token[:, None].astype(np.int64),
            np.ones((b, 1), np.float32),
            reference_embedding,
            attention_mask,
            position_ids,
            past,
        )
        return feeds, attention_mask, position_ids

    def generate(
        self,
        prompt: PromptBatch,
        reference_embedding: np.ndarray,
        config: GenerationConfig,
        max_codes: int,
        rngs: list[np.random.Generator],
        deadline: Deadline = NO_DEADLINE,
    ) -> list[np.ndarray]:
        """Codes (each a 1-D int64 array of length <= max_codes) for every prompt row; `deadline`
        is checked before every personalizer call."""
        if config.strategy == "beam":
            return self._beam(prompt, reference_embedding, config, max_codes, deadline)
        b = prompt.input_ids.shape[0]
        empty = [np.zeros((b, *self.kv_shape[:1], 0, self.kv_shape[1]), np.float32)] * (
            2 * self.num_layers
        )
        feeds = self._feeds(
            prompt.input_ids,
            prompt.embed_keep,
            reference_embedding,
            prompt.attention_mask,
            prompt.position_ids,
            empty,
        )
        attention_mask, position_ids = prompt.attention_mask, prompt.position_ids
        codes: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, dtype=bool)
        for n in range(max_codes + 1):
            deadline.check(n, max_codes, "visual tokens")
            logits, past = self._run(feeds)
            if n < config.min_new_tokens:
                logits[:, END] = -np.inf
            if n == max_codes:
                break
            columns = np.array([self._choose(logits[r], config, rngs[r]) for r in range(b)])
            for r in np.flatnonzero(~done):
                if columns[r] == END:
                    done[r] = True
                else:
                    codes[r].append(int(columns[r]) - 1)
            if done.all():
                break
            feeds, attention_mask, position_ids = self._next_feeds(
                columns, reference_embedding, attention_mask, position_ids, past
            )
        return [np.asarray(c, dtype=np.int64) for c in codes]

    @staticmethod
    def _choose(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
        if config.strategy == "greedy":
            return int(np.argmax(logits))
        logits = logits / config.temperature
        k = min(config.top_k, int(np.isfinite(logits).sum()))
        top = np.argpartition(-logits, k - 1)[:k]
        p = np.exp(logits[top] - logits[top].max())
        return int(top[rng.choice(k, p=p / p.sum())])

    def _beam(
        self,
        prompt: PromptBatch,
        reference_embedding: np.ndarray,
        config: GenerationConfig,
        max_codes: int,
        deadline: Deadline = NO_DEADLINE,
    ) -> list[np.ndarray]:
        """Beam search with HF's length normalisation (sum log p / length)."""
        nb = config.num_beams
        b = prompt.input_ids.shape[0]

        def expand(x: np.ndarray) -> np.ndarray:  # (b, ...) -> (b * nb, ...)
            return np.repeat(x, nb, axis=0)

        attention_mask, position_ids = expand(prompt.attention_mask), expand(prompt.position_ids)
        ref = expand(reference_embedding)
        empty = [np.zeros((b * nb, self.kv_shape[0], 0, self.kv_shape[1]), np.float32)] * (
            2 * self.num_layers
        )
        feeds = self._feeds(
            expand(prompt.input_ids),
            expand(prompt.embed_keep),
            ref,
            attention_mask,
            position_ids,
            empty,
        )
        scores = np.tile(np.array([0.0] + [-np.inf] * (nb - 1)), b)  # (b * nb,)
        beams: list[list[int]] = [[] for _ in range(b * nb)]
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        for n in range(max_codes + 1):
            deadline.check(n, max_codes, "visual tokens")
            logits, past = self._run(feeds)
            logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            if n < config.min_new_tokens:
                logp[:, END] = -np.inf
            if n == max_codes:  # length limit: every live beam ends here, paying for </img>
                for row in range(b * nb):
                    if np.isfinite(scores[row]):
                        finished[row // nb].append(
                            ((scores[row] + logp[row, END]) / (n + 1), beams[row])
                        )
                break
            v = logp.shape[1]
            total = (scores[:, None] + logp).reshape(b, nb * v)
            new_rows, new_cols, new_scores = [], [], []
            for i in range(b):
                order = np.argsort(-total[i], kind="stable")[: 2 * nb]
                chosen = 0
                for flat in order:
                    src, col = i * nb + flat // v, flat % v
                    if not np.isfinite(total[i, flat]):
                        break
                    if col == END:
                        finished[i].append((total[i, flat] / (n + 1), beams[src]))
                        continue
                    new_rows.append(src)
                    new_cols.append(col)
                    new_scores.append(total[i, flat])
                    chosen += 1
                    if chosen == nb:
                        break
                while chosen < nb:  # keep the beam count fixed with dead beams
                    new_rows.append(i * nb)
                    new_cols.append(1)
                    new_scores.append(-np.inf)
                    chosen += 1
            rows = np.array(new_rows)
            beams = [beams[r] + [int(c) - 1] for r, c in zip(rows, new_cols, strict=False)]
            scores = np.array(new_scores)
            past = [p[rows] for p in past]
            attention_mask, position_ids = attention_mask[rows], position_ids[rows]
            if all(len(f) >= nb for f in finished) and n >= config.min_new_tokens:
                best_alive = scores.reshape(b, nb).max(axis=1) / (n + 2)
                if all(max(s for s, _ in finished[i]) >= best_alive[i] for i in range(b)):
                    break
            feeds, attention_mask, position_ids = self._next_feeds(
                np.array(new_cols), ref, attention_mask, position_ids, past
            )
        return [np.asarray(max(f, key=lambda h: h[0])[1], dtype=np.int64) for f in finished]
