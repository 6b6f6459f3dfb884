"""`pigeon.core.style_start`: the reference recoloured from the history, checked against the formulas."""

import dataclasses

import numpy as np
import pytest

from pigeon.config import preset
from pigeon.core.style_start import WHITE, foreground, recolour, recolour_image
from pigeon.inference.pipeline import (
    GenerationRequest,
    RequestError,
    check_request,
    reference_start,
)


def _sticker(rng, colours, size=16, margin=3):
    """A white square with a noisy coloured block inside: (3, size, size) in [0, 1]."""
    img = np.ones((3, size, size), np.float32)
    block = np.asarray(colours, np.float32)[:, None, None] + 0.08 * rng.standard_normal(
        (3, size - 2 * margin, size - 2 * margin)
    ).astype(np.float32)
    img[:, margin:-margin, margin:-margin] = np.clip(block, 0.0, 0.9)
    return img


def test_moments_take_the_historys_mean_and_std_and_keep_the_background():
    rng = np.random.default_rng(0)
    reference = _sticker(rng, (0.2, 0.5, 0.3))
    history = np.stack([_sticker(rng, (0.6, 0.4, 0.5), margin=m) for m in (2, 4, 5)])
    out = recolour(reference, history, "moments")
    mask = foreground(reference)
    hist = history.transpose(1, 0, 2, 3)[:, foreground(history)]
    np.testing.assert_allclose(out[:, mask].mean(1), hist.mean(1), atol=1e-4)
    np.testing.assert_allclose(out[:, mask].std(1), hist.std(1), atol=1e-4)
    np.testing.assert_array_equal(out[:, ~mask], reference[:, ~mask])  # white stays white
    # the shape is the reference's: within each channel the order of the pixels is unchanged
    for c in range(3):
        order = np.argsort(reference[c][mask])
        assert (np.diff(out[c][mask][order]) >= 0).all()


def test_histogram_puts_the_historys_quantiles_at_the_references_ranks():
    rng = np.random.default_rng(1)
    reference = _sticker(rng, (0.3, 0.3, 0.6))
    history = np.stack([_sticker(rng, (0.7, 0.5, 0.1)), _sticker(rng, (0.8, 0.2, 0.1))])
    out = recolour(reference, history, "histogram")
    mask = foreground(reference)
    hist = history.transpose(1, 0, 2, 3)[:, foreground(history)]
    n = int(mask.sum())
    for c in range(3):
        # second implementation: sort the reference's values, read the history's quantiles in order
        expected = np.quantile(hist[c], (np.arange(n) + 0.5) / n)
        np.testing.assert_allclose(np.sort(out[c][mask]), expected, atol=1e-6)
    np.testing.assert_array_equal(out[:, ~mask], reference[:, ~mask])


def test_nothing_to_take_or_nothing_to_change_leaves_the_reference():
    rng = np.random.default_rng(2)
    reference = _sticker(rng, (0.2, 0.5, 0.3))
    white = np.ones((2, 3, 16, 16), np.float32)
    for method in ("none", "moments", "histogram"):
        np.testing.assert_array_equal(recolour(reference, white, method), reference)
        np.testing.assert_array_equal(recolour(white[0], white, method), white[0])
    assert foreground(np.full((3, 2, 2), WHITE, np.float32)).sum() == 0
    with pytest.raises(ValueError, match="style_start='sepia'"):
        recolour(reference, white, "sepia")


def test_the_pipeline_recolours_only_below_strength_one():
    rng = np.random.default_rng(3)
    config = preset("tiny")
    config = dataclasses.replace(
        config, scheduler=dataclasses.replace(config.scheduler, style_start="moments")
    )
    to_uint8 = lambda x: (x.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    size = config.image_size
    reference = to_uint8(_sticker(rng, (0.2, 0.5, 0.3), size=size, margin=size // 5))
    history = [to_uint8(_sticker(rng, (0.7, 0.3, 0.2), size=size, margin=size // 4))]
    plain = reference.transpose(2, 0, 1).astype(np.float32) / 255.0
    np.testing.assert_allclose(reference_start(config, reference, history, 1.0), plain, atol=1e-6)
    moved = reference_start(config, reference, history, 0.6)
    history_pixels = history[0].transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    np.testing.assert_allclose(moved, recolour(plain, history_pixels, "moments"), atol=1e-6)
    assert np.abs(moved - plain).max() > 0.2
    np.testing.assert_allclose(reference_start(config, reference, None, 0.6), plain, atol=1e-6)
    off = dataclasses.replace(
        config, scheduler=dataclasses.replace(config.scheduler, style_start="none")
    )
    np.testing.assert_allclose(reference_start(off, reference, history, 0.6), plain, atol=1e-6)
    # a request's style_start overrides the checkpoint's, both ways
    np.testing.assert_allclose(
        reference_start(off, reference, history, 0.6, "moments"), moved, atol=1e-6
    )
    np.testing.assert_allclose(
        reference_start(config, reference, history, 0.6, "none"), plain, atol=1e-6
    )


def test_check_request_defaults_and_names_a_bad_style_start():
    config = preset("tiny")
    image = np.full((8, 8, 3), 200, np.uint8)
    request = GenerationRequest([image], image, "a cat")
    assert check_request(config, request).style_start == config.scheduler.style_start
    chosen = dataclasses.replace(request, style_start="histogram")
    assert check_request(config, chosen).style_start == "histogram"
    with pytest.raises(RequestError, match="style_start='sepia' is not one of none, moments"):
        check_request(config, dataclasses.replace(request, style_start="sepia"))


def test_recolour_image_is_recolour_on_uint8_images():
    rng = np.random.default_rng(4)
    reference = _sticker(rng, (0.2, 0.5, 0.3))
    history = np.stack([_sticker(rng, (0.7, 0.3, 0.2)), _sticker(rng, (0.6, 0.6, 0.1))])
    as_uint8 = lambda x: (x.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    out = recolour_image(as_uint8(reference), [as_uint8(h) for h in history], "histogram")
    floats = recolour(
        as_uint8(reference).transpose(2, 0, 1) / np.float32(255),
        np.stack([as_uint8(h).transpose(2, 0, 1) / np.float32(255) for h in history]),
        "histogram",
    )
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - as_uint8(floats).astype(int)).max() <= 1
