import numpy as np

from pigeon.core.prompt import IGNORE, PREFIX, PromptBuilder, left_pad


def test_prompt_layout(tiny_model, tokenizer):
    v = tiny_model.vocab
    builder = PromptBuilder(tokenizer, v)
    hist = [np.array([1, 2]), np.array([3, 4, 5])]
    keep = [np.array([1, 0]), np.array([1, 1, 0])]
    p = builder.build("a cat", hist, keep)
    visual = p.input_ids >= v.visual_offset
    assert (p.input_ids[visual] - v.visual_offset).tolist() == [1, 2, 3, 4, 5]
    assert p.embed_keep[visual].tolist() == [1, 0, 1, 1, 0]
    assert p.keep_source[visual].tolist() == [0, 1, 2, 3, 4]
    assert (p.input_ids == v.emb).sum() == 1 and p.input_ids[-1] == v.img_start
    assert (p.input_ids[~visual] < v.text_vocab_size).sum() == len(p.input_ids) - 5 - 2
    assert (p.labels == IGNORE).all()
    n = len(tokenizer.encode(PREFIX))
    assert tokenizer.decode(p.input_ids[:n].tolist()) == PREFIX


def test_left_padding_and_positions(tiny_model, tokenizer):
    builder = PromptBuilder(tokenizer, tiny_model.vocab)
    short = builder.build("a", [np.array([1])], [np.array([1])])
    long = builder.build("a much longer instruction", [np.array([1, 2, 3])], [np.ones(3)])
    batch = left_pad([short, long])
    pad = batch.input_ids.shape[1] - len(short.input_ids)
    assert pad > 0 and not batch.attention_mask[0, :pad].any() and batch.attention_mask[1].all()
    assert batch.position_ids[0, pad] == 0 and batch.position_ids[0, -1] == len(short.input_ids) - 1
    assert batch.position_ids[1].tolist() == list(range(batch.input_ids.shape[1]))
