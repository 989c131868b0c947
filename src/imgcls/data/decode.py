"""The one image decoder: every path that reads an image file (folders, streams, predict, cam) calls it.

`open_rgb` returns an 8-bit RGB PIL image with the EXIF orientation applied, or raises DecodeError
with a short reason that callers put after the file's name. What it settles, once for every caller:

- Formats: JPEG (camera MPO files too), PNG, WebP, BMP, GIF and TIFF only, so a file named .jpg can never
  reach one of Pillow's rarer parsers (EPS even runs Ghostscript). Multi-frame files give frame one.
- Size: more than MAX_PIXELS (Pillow's own default, 89.5 megapixels) is refused before decoding.
- Truncation: Pillow refuses a truncated file unless PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on, in
  which case it pads the missing part with grey; we refuse to decode at all while that flag is on.
- Pixels: 16-bit images are scaled by their bit depth (Pillow's convert("RGB") clips them at 255);
  transparent pixels are composited over BACKGROUND (Pillow drops alpha and shows whatever colour
  the file keeps under it, often black, often garbage).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from imgcls.errors import UserError

FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG includes cameras' MPO files
FORMAT_NAMES = "JPEG, PNG, WebP, BMP, GIF or TIFF"
MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS: 256 MiB as 24-bit RGB
# White, not black: transparent images are mostly cut-outs, logos and icons drawn to be seen on a
# white page, and their dark strokes would vanish over black.
BACKGROUND = 255.0
STRAIGHT_ALPHA = ("LA", "PA", "RGBA")
PREMULTIPLIED_ALPHA = ("La", "RGBa")
CONVERTIBLE = ("1", "L", "P", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")  # Pillow's own convert("RGB") is right


class DecodeError(ValueError):
    """A file that is not a usable image; the message says why, without the file's name."""


def open_rgb(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Decode `path` to an RGB image, EXIF orientation applied. `min_size`: a JPEG may be decoded at a
    reduced scale (Pillow's draft) as long as both sides stay at least this long."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise UserError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on, so truncated images would decode "
                        "padded with grey; set it back to False before loading data")
    try:
        with Image.open(path, formats=FORMATS) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise DecodeError(f"{width} x {height} pixels is over the limit of {MAX_PIXELS:,}; downscale it")
            if min(width, height) < 1:
                raise DecodeError("the image has no pixels")
            if min_size:
                img.draft(None, (min_size, min_size))
            img.load()
            white = white_level(img) if img.mode.startswith("I") or img.mode == "F" else None  # reads TIFF tags
            img = ImageOps.exif_transpose(img)  # a copy without the tags, independent of the file
    except DecodeError:
        raise
    except Image.UnidentifiedImageError as e:
        raise DecodeError(f"not a {FORMAT_NAMES} image") from e
    except Image.DecompressionBombError as e:
        raise DecodeError(f"the image is over the limit of {MAX_PIXELS:,} pixels; downscale it") from e
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise DecodeError(f"cannot open the file ({e.strerror})") from e
    except Exception as e:  # Pillow's parsers raise many types on damaged data: OSError, SyntaxError, struct.error...
        detail = " ".join(str(e).split())[:200]  # one line, however the parser worded it
        reason = "the file is truncated" if "truncated" in detail else "the image data is damaged"
        raise DecodeError(f"{reason} ({type(e).__name__}: {detail})") from e
    return to_rgb(img, white)


def to_rgb(img: Image.Image, white: float | None = None) -> Image.Image:
    """Any Pillow mode to 8-bit RGB with the right colours: alpha composited over BACKGROUND, high bit
    depths scaled rather than clipped (`white`: the value of full intensity, else white_level(img))."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        gray = _scale_to_8bit(img, white or white_level(img))
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if mode in PREMULTIPLIED_ALPHA:
        pixels = np.asarray(img, dtype=np.float32)
        if mode == "La":
            pixels = pixels[..., [0, 0, 0, 1]]
        return _composite(pixels[..., :3], pixels[..., 3:], premultiplied=True)
    if mode in STRAIGHT_ALPHA or "transparency" in img.info:
        pixels = np.asarray(img.convert("RGBA"), dtype=np.float32)
        return _composite(pixels[..., :3], pixels[..., 3:], premultiplied=False)
    if mode in CONVERTIBLE:
        return img.convert("RGB")
    raise DecodeError(f"unsupported pixel mode {mode}")


def _composite(rgb: np.ndarray, alpha: np.ndarray, premultiplied: bool) -> Image.Image:
    """rgb over BACKGROUND with alpha in 0..255; premultiplied colours already carry the factor alpha."""
    a = alpha / 255.0
    colour = rgb if premultiplied else rgb * a
    out = colour + BACKGROUND * (1.0 - a)
    return Image.fromarray(np.round(out).clip(0, 255).astype(np.uint8))


def white_level(img: Image.Image) -> float:
    """The sample value that means full intensity in a one-channel I;16/I/F image.

    I;16: 65535. I: a TIFF's 32 bits when it says so (signed unless its SampleFormat says unsigned),
    else 65535: Pillow and most formats keep 16-bit samples in I images. F: 1.0, the usual convention
    for float images (and torchvision's)."""
    if img.mode == "F":
        return 1.0
    tags = getattr(img, "tag_v2", {})  # TIFF only
    if img.mode == "I" and tags.get(258) in (32, (32,)):
        unsigned = tags.get(339) in (1, (1,))
        return float(2**32 - 1 if unsigned else 2**31 - 1)
    return 65535.0


def _scale_to_8bit(img: Image.Image, white: float) -> np.ndarray:
    values = np.asarray(img).astype(np.float64)
    scaled = np.nan_to_num(values, nan=0.0).clip(0, white) * (255.0 / white)
    return np.round(scaled).astype(np.uint8)
