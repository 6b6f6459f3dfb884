"""Visual-token generation on the real tiny personalizer."""

import dataclasses

import numpy as np
import pytest
import torch

from pigeon.config import GenerationConfig
from pigeon.core.decoding import Decoder
from pigeon.core.prompt import PromptBuilder, left_pad
from pigeon.inference.runners import TorchRunner


def setup(model, tokenizer, texts=("a cat", "a very small green dog"), resident=False):
    runner = TorchRunner(model, resident=resident)
    c = model.config.personalizer
    decoder = Decoder(
        lambda f: runner.run("personalizer", f),
        model.vocab,
        c.num_layers,
        c.num_heads,
        c.hidden_size // c.num_heads,
    )
    builder = PromptBuilder(tokenizer, model.vocab)
    rng = np.random.default_rng(0)
    prompts = []
    for text in texts:
        hist = [rng.integers(0, 64, n) for n in (5, 7)]
        prompts.append(builder.build(text, hist, [np.ones(len(h)) for h in hist]))
    batch = left_pad(prompts)
    ref = rng.standard_normal((len(texts), model.config.condition_adapter.context_dim)).astype(
        np.float32
    )
    return decoder, batch, ref


def rngs(n, seed=0):
    return [np.random.default_rng(seed + i) for i in range(n)]


def test_greedy_with_cache_equals_argmax_of_full_forward(tiny_model, tokenizer):
    decoder, batch, ref = setup(tiny_model, tokenizer)
    codes = decoder.generate(batch, ref, GenerationConfig(min_new_tokens=16), 16, rngs(2))
    v = tiny_model.vocab
    allowed = torch.cat([torch.tensor([v.img_end]), torch.arange(v.visual_offset, v.size)])
    for row, generated in enumerate(codes):
        n = int(batch.attention_mask[row].sum())
        ids = torch.from_numpy(batch.input_ids[row, -n:])[None]
        for code in generated:  # recompute each step from scratch, no cache
            mask = torch.ones_like(ids)
            with torch.no_grad():
                logits, _ = tiny_model.personalizer(
                    ids,
                    torch.ones(ids.shape),
                    torch.from_numpy(ref[row : row + 1]),
                    mask,
                    (mask.cumsum(1) - 1),
                )
            step = logits[0, -1, allowed]
            step[0] = -float("inf")  # min_new_tokens covers every step here
            assert int(step.argmax()) - 1 == code
            ids = torch.cat([ids, torch.tensor([[code + v.visual_offset]])], dim=1)


def test_only_visual_codes_are_generated_and_length_is_bounded(tiny_model, tokenizer):
    decoder, batch, ref = setup(tiny_model, tokenizer)
    for strategy in ("greedy", "top_k", "beam"):
        config = GenerationConfig(strategy=strategy, num_beams=3, top_k=5)
        for codes in decoder.generate(batch, ref, config, 16, rngs(2)):
            assert codes.dtype == np.int64 and len(codes) <= 16
            assert codes.min(initial=0) >= 0 and codes.max(initial=0) < 64


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_generation_stops_at_end_token_after_min_new_tokens(tiny_model, tokenizer, strategy):
    decoder, batch, ref = setup(tiny_model, tokenizer)
    real_step = decoder.step

    def end_is_best(feeds):  # the real model's outputs, with </img> made the most likely token
        out = real_step(feeds)
        out["visual_logits"][:, 0] = out["visual_logits"].max(axis=1) + 5.0
        return out

    decoder.step = end_is_best
    config = GenerationConfig(strategy=strategy, min_new_tokens=3, num_beams=2)
    codes = decoder.generate(batch, ref, config, 16, rngs(2))
    assert [len(c) for c in codes] == [3, 3]
    config = dataclasses.replace(config, min_new_tokens=0)
    assert [len(c) for c in decoder.generate(batch, ref, config, 16, rngs(2))] == [0, 0]


def test_top_k_one_and_single_beam_equal_greedy(tiny_model, tokenizer):
    decoder, batch, ref = setup(tiny_model, tokenizer)
    greedy = decoder.generate(batch, ref, GenerationConfig(), 16, rngs(2))
    top1 = decoder.generate(batch, ref, GenerationConfig(strategy="top_k", top_k=1), 16, rngs(2))
    beam1 = decoder.generate(
        batch, ref, GenerationConfig(strategy="beam", num_beams=1), 16, rngs(2)
    )
    for a, b, c in zip(greedy, top1, beam1, strict=False):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_sampling_is_seeded_per_request(tiny_model, tokenizer):
    decoder, batch, ref = setup(tiny_model, tokenizer)
    config = GenerationConfig(strategy="top_k", top_k=20, temperature=2.0)
    a = decoder.generate(batch, ref, config, 16, rngs(2, seed=5))
    b = decoder.generate(batch, ref, config, 16, rngs(2, seed=5))
    c = decoder.generate(batch, ref, config, 16, rngs(2, seed=6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=False))


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(tiny_model, tokenizer):
    """Beam search maximises the length-normalised log-probability; greedy is one of its candidates
    only approximately, so compare the summed log-probabilities under the model."""
    decoder, batch, ref = setup(tiny_model, tokenizer, texts=("a cat",))
    config = GenerationConfig(min_new_tokens=4)
    greedy = decoder.generate(batch, ref, config, 4, rngs(1))[0]
    beam = decoder.generate(
        batch, ref, dataclasses.replace(config, strategy="beam", num_beams=4), 4, rngs(1)
    )[0]
    v = tiny_model.vocab

    def logprob(codes):
        ids = torch.from_numpy(np.concatenate([batch.input_ids[0], codes + v.visual_offset]))[None]
        mask = torch.ones_like(ids)
        with torch.no_grad():
            logits, _ = tiny_model.personalizer(
                ids, torch.ones(ids.shape), torch.from_numpy(ref), mask, mask.cumsum(1) - 1
            )
        allowed = torch.arange(v.visual_offset, v.size)
        logp = torch.log_softmax(logits[0, :, torch.cat([torch.tensor([v.img_end]), allowed])], -1)
        n = batch.input_ids.shape[1]
        return sum(float(logp[n - 1 + j, 1 + c]) for j, c in enumerate(codes))

    assert len(greedy) == len(beam) == 4
    assert logprob(beam) >= logprob(greedy) - 1e-6


@pytest.mark.parametrize("strategy", ["greedy", "top_k", "beam"])
def test_a_device_resident_cache_decodes_the_same_codes(tiny_model, tokenizer, strategy):
    """The KV cache kept as torch tensors between steps (what a GPU runner does) gives the codes
    of the NumPy round trip, beam reordering included."""
    config = GenerationConfig(strategy=strategy, num_beams=3, top_k=5, min_new_tokens=8)
    expected = setup(tiny_model, tokenizer)
    resident = setup(tiny_model, tokenizer, resident=True)
    past = {}
    step = resident[0].step
    resident[0].step = lambda feeds: past.update(feeds) or step(feeds)
    got = resident[0].generate(resident[1], resident[2], config, 12, rngs(2))
    assert isinstance(past["past_key_0"], torch.Tensor)  # the cache really stayed a tensor
    want = expected[0].generate(expected[1], expected[2], config, 12, rngs(2))
    assert [c.tolist() for c in got] == [c.tolist() for c in want]
