"""Image input and output, the same for the CLI, the pipeline and the Triton models.

Any mode is accepted and converted to RGB: transparency (RGBA, LA, P with a transparent colour) is
composited on white, as EmojiPrefs renders its images. A non-square image is padded to a square on
white (content centred, never cropped), then resized with bicubic filtering. Images above
`MAX_PIXELS` are refused from their header, before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pigeon.files import write_atomic

MAX_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """An image that cannot be used; the message names it and says why."""


def _open(source: Image.Image | bytes | str | Path, name: str) -> Image.Image:
    try:
        if isinstance(source, Image.Image):
            return source
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
        image = Image.open(fp)
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: exceeds the limit of {MAX_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # PIL's header errors
        raise ImageError(f"{name}: not a readable image ({exc.__class__.__name__})") from None
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: {w}x{h} pixels exceeds the limit of {MAX_PIXELS} pixels")
    if w < 1 or h < 1:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: truncated or corrupt image data ({exc})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, transparency composited on white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: Image.Image | bytes | str | Path, name: str | None = None) -> np.ndarray:
    """A file path, encoded bytes or a PIL image -> uint8 RGB array (H, W, 3)."""
    name = name or (str(source) if isinstance(source, (str, Path)) else "image")
    return np.asarray(to_rgb(_open(source, name)), dtype=np.uint8)


def check_array(image: np.ndarray, name: str = "image") -> np.ndarray:
    """A raw uint8 image: (H, W, 3) RGB or (H, W, 4) RGBA (composited on white)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ImageError(f"{name}: expected a uint8 array, got {dtype}")
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise ImageError(f"{name}: expected shape (H, W, 3) or (H, W, 4), got {image.shape}")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageError(f"{name}: {image.shape[1]}x{image.shape[0]} exceeds {MAX_PIXELS} pixels")
    if image.shape[2] == 4:
        return np.asarray(to_rgb(Image.fromarray(image, "RGBA")), dtype=np.uint8)
    return image


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3), bicubic; the image itself where it has that size."""
    if image.shape[0] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def to_model_input(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, size, size) in [0, 1]: pad to square on white, bicubic resize."""
    h, w = image.shape[:2]
    side = max(h, w)
    if h != w:
        square = np.full((side, side, 3), 255, dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top : top + h, left : left + w] = image
        image = square
    return resize(image, size).astype(np.float32).transpose(2, 0, 1) / 255.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float (batch, 3, H, W) in [0, 1] -> uint8 (batch, H, W, 3)."""
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write atomically: a reader never sees a half-written file."""
    write_atomic(path, encode_png(image))
