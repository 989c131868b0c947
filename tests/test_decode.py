"""The one image decoder: every Pillow mode to the right RGB pixels, orientation, frames, limits, errors.

Expected pixels are computed here from the colour-space definitions, not by asking Pillow."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from imgcls.data import decode
from imgcls.data.decode import DecodeError, open_rgb, to_rgb
from imgcls.data.folder import IMG_EXTS, decode_all, load_image, scan
from imgcls.data.preprocessing import Preprocessing
from imgcls.errors import UserError
from imgcls.inference.files import load_images


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def saved(tmp_path, img: Image.Image, name: str, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def row(values, dtype):
    return np.array([values], dtype=dtype)


# --- high bit depths: scaled by their depth, never clipped ------------------------------------------

@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_16_bit_gray_is_scaled_not_clipped(tmp_path, fmt):
    values = [0, 257, 32768, 65535]
    path = saved(tmp_path, Image.fromarray(row(values, np.uint16)), f"g16.{fmt}")
    assert Image.open(path).mode == "I;16"
    got = pixels(open_rgb(path))[0]
    assert got[:, 0].tolist() == [round(v * 255 / 65535) for v in values] == [0, 1, 128, 255]
    assert (got == got[:, :1]).all()  # gray: R = G = B


def test_big_endian_16_bit():
    img = Image.fromarray(row([65535, 32768], ">u2"))
    assert img.mode == "I;16B" and pixels(to_rgb(img))[0, :, 0].tolist() == [255, 128]


def test_32_bit_int_and_float_images(tmp_path):
    ints = saved(tmp_path, Image.fromarray(row([2**31 - 1, 2**30, -5], np.int32)), "i32.tif")
    assert Image.open(ints).mode == "I"
    assert pixels(open_rgb(ints))[0, :, 0].tolist() == [255, round(2**30 * 255 / (2**31 - 1)), 0]
    floats = saved(tmp_path, Image.fromarray(row([0.5, 1.0, 2.0, -1.0, np.nan], np.float32)), "f.tif")
    assert Image.open(floats).mode == "F"
    assert pixels(open_rgb(floats))[0, :, 0].tolist() == [128, 255, 255, 0, 0]  # float images: 0..1


# --- transparency: composited over white --------------------------------------------------------

def over_white(colour, alpha):
    return round(colour * alpha / 255 + 255 * (1 - alpha / 255))


def test_rgba_composites_over_white_instead_of_showing_the_hidden_colour(tmp_path):
    rgba = np.array([[[200, 0, 0, 0], [200, 0, 0, 255], [200, 40, 0, 128]]], np.uint8)
    got = pixels(open_rgb(saved(tmp_path, Image.fromarray(rgba), "a.png")))[0]
    assert got[0].tolist() == [255, 255, 255]  # fully transparent: background, not the hidden red
    assert got[1].tolist() == [200, 0, 0]
    assert got[2].tolist() == [over_white(200, 128), over_white(40, 128), over_white(0, 128)]


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_with_and_without_a_transparent_index(tmp_path, fmt):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    opaque = pixels(open_rgb(saved(tmp_path, img, f"p.{fmt}")))[0]
    assert opaque.tolist() == [[10, 20, 30], [200, 100, 50]]
    keyed = pixels(open_rgb(saved(tmp_path, img, f"t.{fmt}", transparency=1)))[0]
    assert keyed.tolist() == [[10, 20, 30], [255, 255, 255]]


def test_gray_alpha_and_premultiplied_modes():
    la = Image.frombytes("LA", (3, 1), bytes([0, 0, 100, 255, 0, 51]))
    assert pixels(to_rgb(la))[0, :, 0].tolist() == [255, 100, over_white(0, 51)]
    # premultiplied: the stored colour is already colour * alpha, so over white it is that plus white * (1 - alpha)
    rgba_pre = Image.frombytes("RGBa", (2, 1), bytes([50, 20, 0, 100, 0, 0, 0, 0]))
    expected = [[round(c + 255 * (1 - 100 / 255)) for c in (50, 20, 0)], [255, 255, 255]]
    assert pixels(to_rgb(rgba_pre))[0].tolist() == expected
    la_pre = Image.frombytes("La", (1, 1), bytes([50, 100]))
    assert pixels(to_rgb(la_pre))[0, 0, 0] == round(50 + 255 * (1 - 100 / 255))


# --- other colour spaces ------------------------------------------------------------------------

def test_bilevel_and_cmyk(tmp_path):
    bilevel = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    assert pixels(open_rgb(saved(tmp_path, bilevel, "b.png")))[0, :, 0].tolist() == [0, 255]
    cmyk = [(255, 0, 0, 0), (0, 0, 0, 128), (128, 64, 0, 64)]
    img = Image.new("CMYK", (3, 1))
    for x, v in enumerate(cmyk):
        img.putpixel((x, 0), v)
    expected = [[(255 - c) * (255 - k) / 255 for c in v[:3]] for v in cmyk for k in [v[3]]]
    got = pixels(open_rgb(saved(tmp_path, img, "c.tif")))[0]
    assert np.abs(got - np.array(expected)).max() <= 1


def test_adobe_cmyk_jpeg_is_not_inverted(tmp_path):
    """Photoshop stores CMYK JPEGs inverted (with an Adobe marker); decoded naively, cyan turns red."""
    path = saved(tmp_path, Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "cyan.jpg", quality=95)
    assert Image.open(path).info.get("adobe") is not None
    got = pixels(open_rgb(path))[8, 8]
    assert np.abs(got - [0, 255, 255]).max() <= 3  # JPEG rounding


def test_ycbcr_lab_and_hsv():
    y, cb, cr = 100, 90, 160  # JFIF's full-range YCbCr
    expected = [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)]
    got = pixels(to_rgb(Image.new("YCbCr", (1, 1), (y, cb, cr))))[0, 0]
    assert np.abs(got - np.array(expected)).max() <= 1

    def lab_gray(lightness):  # CIE L* to the sRGB value of that neutral gray (D50 white)
        lum = ((lightness + 16) / 116) ** 3 if lightness > 8 else lightness / 903.3
        return 255 * (12.92 * lum if lum <= 0.0031308 else 1.055 * lum ** (1 / 2.4) - 0.055)

    for stored in (255, 128, 64):
        got = pixels(to_rgb(Image.new("LAB", (1, 1), (stored, 128, 128))))[0, 0]
        assert np.abs(got - lab_gray(stored * 100 / 255)).max() <= 2, stored
    hsv = {(0, 255, 255): [255, 0, 0], (85, 255, 255): [0, 255, 0], (170, 255, 128): [0, 0, 128],
           (0, 0, 200): [200, 200, 200]}
    for value, rgb in hsv.items():
        assert pixels(to_rgb(Image.new("HSV", (1, 1), value)))[0, 0].tolist() == rgb, value


# --- orientation and frames ---------------------------------------------------------------------

def _red_left_blue_right(w=64, h=32):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = [220, 20, 20]
    img[:, w // 2 :] = [20, 20, 220]
    return Image.fromarray(img)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the stored left edge becomes the top
    path = saved(tmp_path, _red_left_blue_right(), "rot.jpg", exif=exif, quality=95)
    img = open_rgb(path)
    assert img.size == (32, 64)
    top, bottom = pixels(img)[2, 16], pixels(img)[61, 16]
    assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0]
    square = load_image(path, 16).astype(int)  # the same through the resize-and-crop every path uses
    assert square[0, 8, 0] > 180 and square[15, 8, 2] > 180


@pytest.mark.parametrize("fmt", ["gif", "tif", "webp"])
def test_multi_frame_files_give_the_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 8), (230, 10, 10)), Image.new("RGB", (8, 8), (10, 10, 230))]
    path = tmp_path / f"anim.{fmt}"
    frames[0].save(path, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "webp" else {}))
    assert getattr(Image.open(path), "n_frames", 1) == 2
    got = pixels(open_rgb(path))[4, 4]
    assert got[0] > 200 and got[2] < 40


def test_gif_and_tiff_files_are_found_in_folders(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for ext in (".gif", ".tif", ".tiff", ".png"):
            Image.new("RGB", (4, 4)).save(tmp_path / cls / f"x{ext}")
    _, splits = scan(tmp_path)
    assert {".gif", ".tif", ".tiff"} <= IMG_EXTS and len(splits["train"][0]) == 8


# --- limits and failures ------------------------------------------------------------------------

def _png_declaring(width, height):
    """A tiny valid-looking PNG whose header declares width x height (its data is one row's worth)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(10_000, 9_000), (100_000, 100_000)])  # over the limit; over twice it
def test_huge_declared_sizes_are_refused_before_decoding(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(width, height))
    with pytest.warns(Image.DecompressionBombWarning) if width * height < 2 * decode.MAX_PIXELS else _nothing():
        with pytest.raises(DecodeError, match="limit of 89,478,485"):
            open_rgb(path)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _jpeg_bytes():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_truncated_files_are_refused_even_if_pillow_is_told_to_pad(tmp_path, monkeypatch):
    path = tmp_path / "cut.jpg"
    path.write_bytes(_jpeg_bytes()[:1500])
    with pytest.raises(DecodeError, match="truncated"):
        open_rgb(path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what some libraries do on import
    with pytest.raises(UserError, match="LOAD_TRUNCATED_IMAGES"):
        open_rgb(path)


def test_only_the_listed_formats_are_parsed(tmp_path):
    """An EPS file named .jpg would make Pillow run Ghostscript; it is not even identified."""
    path = tmp_path / "x.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(DecodeError, match="not a JPEG, PNG, WebP, BMP, GIF or TIFF image"):
        open_rgb(path)


def _damaged_png():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[200:240] = bytes(40)  # zeros over the compressed pixels
    return bytes(data)


@pytest.mark.parametrize("content, reason", [(b"", "not a JPEG"), ("png", "damaged"), ("jpg", "truncated")])
def test_predict_names_the_file_and_the_problem_in_one_line(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes({"png": _damaged_png(), "jpg": _jpeg_bytes()[:700]}.get(content, content))
    with pytest.raises(UserError, match=reason) as e:
        load_images([path], Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_folder_decoding_skips_and_names_each_unreadable_file(tmp_path, capsys):
    good = saved(tmp_path, Image.new("RGB", (8, 8), (1, 2, 3)), "good.png")
    empty, bomb = tmp_path / "empty.png", tmp_path / "bomb.png"
    empty.write_bytes(b"")
    bomb.write_bytes(_png_declaring(100_000, 100_000))
    images, labels = decode_all([good, empty, bomb], [0, 1, 2], 8)
    err = capsys.readouterr().err
    assert images.shape == (1, 3, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == [0]
    assert f"{empty} (not a JPEG" in err and f"{bomb} (the image is over the limit" in err
    assert "skipped 2 unreadable image(s) of 3" in err
