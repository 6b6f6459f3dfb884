"""Mask generator invariants, the NumPy twin, and straight-through gradients."""

import numpy as np
import pytest
import torch

from pigeon.core import masking
from pigeon.models import mask_generator as mg


@pytest.mark.parametrize(
    "n,r,k", [(10, 0.2, 8), (10, 0.0, 10), (10, 1.0, 1), (3, 0.9, 1), (7, 0.5, 3), (257, 0.2, 205)]
)
def test_k_formula(n, r, k):
    assert masking.num_kept(n, r) == k == max(1, int(n * (1 - r)))


def sequence(hist_lens=(4, 6, 5), ref_len=8):
    runs = [np.arange(n) for n in hist_lens]
    return masking.mask_sequence(runs, np.arange(ref_len))


def test_mask_sequence_positions_and_types():
    ids, pos, types = sequence((2, 3), 2)
    assert pos.tolist() == [1, 2, 1, 2, 3, 1, 2]
    assert types.tolist() == [1, 1, 1, 1, 1, 2, 2]


def test_history_top_k_is_joint_over_all_history_tokens():
    _, _, types = sequence()
    scores = np.zeros((1, len(types)))
    scores[0, :4] = 5.0  # image 0 scores highest: it keeps all of its tokens
    keep = masking.select_keep(scores, types[None], history_ratio=0.5, reference_ratio=0.0)
    n_hist = 15
    assert keep[0, :n_hist].sum() == masking.num_kept(n_hist, 0.5) == 7
    assert keep[0, :4].sum() == 4  # per-image ratios vary: the joint top-k took all of image 0
    assert keep[0, n_hist:].sum() == 8


def test_reference_keep_probability_flips_between_training_and_inference():
    _, _, types = sequence((3,), 6)
    scores = np.array([[0, 0, 0, 0.9, 0.8, 0.7, 0.1, 0.0, -0.5]])
    infer = masking.select_keep(scores, types[None], history_ratio=0.0, reference_ratio=0.5)
    train = masking.select_keep(
        scores, types[None], history_ratio=0.0, reference_ratio=0.5, training=True
    )
    # inference keeps the highest-scoring reference tokens, training the lowest
    assert infer[0, 3:].tolist() == [1, 1, 1, 0, 0, 0]
    assert train[0, 3:].tolist() == [0, 0, 0, 1, 1, 1]


def test_padding_is_never_kept_and_rows_are_independent():
    a, b = sequence((2, 2), 3), sequence((4,), 2)
    types = masking.pad_right([a[2], b[2]])
    scores = np.random.default_rng(0).standard_normal(types.shape)
    keep = masking.select_keep(scores, types, history_ratio=0.2, reference_ratio=0.3)
    assert not keep[types == 0].any()
    alone = masking.select_keep(
        scores[1:, : len(b[2])], types[1:, : len(b[2])], history_ratio=0.2, reference_ratio=0.3
    )
    np.testing.assert_array_equal(keep[1, : len(b[2])], alone[0])


@pytest.mark.parametrize("training", [False, True])
def test_torch_and_numpy_selections_agree(training):
    _, _, types = sequence()
    rng = np.random.default_rng(3)
    scores = rng.uniform(-1, 1, (2, len(types)))
    noise = masking.gumbel_noise(rng, scores.shape)
    types2 = np.stack([types, types])
    ours = masking.select_keep(
        scores, types2, history_ratio=0.2, reference_ratio=0.4, training=training, gumbel=noise
    )
    theirs = mg.select_keep(
        torch.from_numpy(scores),
        torch.from_numpy(types2),
        history_ratio=0.2,
        reference_ratio=0.4,
        training=training,
        gumbel=torch.from_numpy(noise),
    )
    np.testing.assert_array_equal(ours, theirs.numpy())


def test_straight_through_is_hard_forward_with_gradient_to_scores():
    _, _, types = sequence()
    scores = torch.randn(1, len(types), requires_grad=True)
    keep = mg.select_keep(
        scores,
        torch.from_numpy(types)[None],
        history_ratio=0.2,
        reference_ratio=0.5,
        training=True,
        straight_through=True,
        gumbel=torch.zeros(1, len(types)),
    )
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}
    (keep * torch.arange(len(types))).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_scores_ignore_padding(tiny_model):
    gen = tiny_model.mask_generator.eval()
    d = tiny_model.config.personalizer.hidden_size
    embeds = torch.randn(1, 6, d)
    pos = torch.tensor([[1, 2, 3, 1, 2, 3]])
    types = torch.tensor([[1, 1, 1, 2, 2, 2]])
    with torch.no_grad():
        s = gen(embeds, pos, types)
        padded = gen(
            torch.cat([embeds, torch.randn(1, 3, d)], 1),
            torch.cat([pos, torch.zeros(1, 3, dtype=torch.long)], 1),
            torch.cat([types, torch.zeros(1, 3, dtype=torch.long)], 1),
        )
    torch.testing.assert_close(s, padded[:, :6], atol=1e-5, rtol=1e-5)
    assert (s.abs() <= 1 + 1e-6).all()  # cosine scores


def test_random_mask_type_masks_ceil_n_r_reference_tokens():
    _, _, types = sequence((3,), 10)
    keep = mg.random_reference_keep(
        torch.from_numpy(types)[None], 0.25, torch.Generator().manual_seed(0)
    )
    assert keep[0, :3].sum() == 3  # history untouched
    assert keep[0, 3:].sum() == 10 - 3  # ceil(10 * 0.25) = 3 masked


def test_encoder_layer_matches_torch_transformer_encoder_layer():
    """Our export-friendly layer computes what nn.TransformerEncoderLayer (the official code's) does."""
    from torch import nn

    from pigeon.models.layers import EncoderLayer

    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(
        16, 4, dim_feedforward=32, dropout=0.0, batch_first=True
    ).eval()
    ours = EncoderLayer(16, 4, 32, 0.0).eval()
    w, b = ref.self_attn.in_proj_weight, ref.self_attn.in_proj_bias
    with torch.no_grad():
        ours.self_attn.q.weight.copy_(w[:16])
        ours.self_attn.q.bias.copy_(b[:16])
        ours.self_attn.kv.weight.copy_(w[16:])
        ours.self_attn.kv.bias.copy_(b[16:])
        ours.self_attn.proj.load_state_dict(ref.self_attn.out_proj.state_dict())
        for name in ("linear1", "linear2", "norm1", "norm2"):
            getattr(ours, name).load_state_dict(getattr(ref, name).state_dict())
        x = torch.randn(2, 7, 16)
        keep = torch.ones(2, 7, dtype=torch.bool)
        keep[1, 5:] = False
        expected = ref(x, src_key_padding_mask=~keep)
        got = ours(x, keep)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :5], expected[1, :5], atol=1e-5, rtol=1e-5)
