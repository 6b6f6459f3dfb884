import io

import numpy as np
import pytest
from PIL import Image

from pigeon.core import images as im


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_transparency_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgb = im.load_image(png_bytes(Image.fromarray(rgba, "RGBA")))
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[1, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA", "I;16"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new(mode, (5, 3))
    if mode == "CMYK":
        buf = io.BytesIO()
        image.save(buf, format="JPEG")
        data = buf.getvalue()
    else:
        data = png_bytes(image)
    out = im.load_image(data)
    assert out.shape == (3, 5, 3) and out.dtype == np.uint8


def test_non_square_is_padded_not_cropped():
    image = np.zeros((10, 20, 3), np.uint8)  # black, wide
    x = im.to_model_input(image, 20)
    assert x.shape == (3, 20, 20)
    assert (x[:, :5] == 1.0).all() and (x[:, 15:] == 1.0).all()  # white bands above and below
    assert (x[:, 5:15] == 0.0).all()  # all content kept


def test_errors_name_the_file(tmp_path):
    with pytest.raises(im.ImageError, match="nope.png: file not found"):
        im.load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(im.ImageError, match="bad.png: not a readable image"):
        im.load_image(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(im.ImageError, match="empty.png: not a readable image"):
        im.load_image(empty)
    with pytest.raises(im.ImageError, match="is a directory"):
        im.load_image(tmp_path)


def test_truncated_image_is_refused():
    data = png_bytes(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    )
    with pytest.raises(im.ImageError, match="truncated or corrupt|not a readable image"):
        im.load_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_from_the_header():
    bomb = png_bytes(Image.new("1", (5000, 5000)))  # 25 MPixel, a few kB on disk
    assert len(bomb) < 100_000
    with pytest.raises(im.ImageError, match="5000x5000 pixels exceeds the limit"):
        im.load_image(bomb)


def test_one_pixel_image_works():
    assert im.to_model_input(im.load_image(png_bytes(Image.new("RGB", (1, 1)))), 8).shape == (
        3,
        8,
        8,
    )


def test_png_round_trip(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (9, 7, 3), dtype=np.uint8)
    im.save_png(image, tmp_path / "o.png")
    np.testing.assert_array_equal(im.load_image(tmp_path / "o.png"), image)
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]  # nothing left half-written
