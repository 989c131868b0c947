"""Seeded fuzzing of image files through every real decoding path.

Small real files (PNG, JPEG, GIF, WebP, BMP, TIFF in several modes) are mutated: bit flips, byte
overwrites, truncation, corrupted headers, huge declared dimensions, random bytes and empty files
under image names. Each batch of files goes through folder.decode_all (in-memory folders), the
streamed StreamingImages behind a Split, Grad-CAM's load_images, and predict's file reader (an error
row per unreadable file). Whatever the bytes:

- no exception escapes except the intended one (load_images' UserError); the folder paths skip, and
  predict's reader turns the file into an error;
- every unreadable file is named in a warning, and no readable one is;
- a decoded image is always uint8 3 x S x S (S x S x 3 on the inference paths), and the four paths agree
  on which files decode and on their pixels (they share one decoder);
- nothing hangs: a watchdog alarm fails the test instead of letting it stall CI.
"""

import io
import re
import signal
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data import Split, load_dataset
from imgcls.data.folder import StreamingImages, decode_all
from imgcls.data.preprocessing import Preprocessing
from imgcls.errors import UserError
from imgcls.inference import files as inference_files
from imgcls.inference.files import load_images

SIZE = 16
PREP = Preprocessing(SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def seeds():
    """(extension, bytes) of real small files in the formats and modes folders hold."""
    mini = load_dataset("cifar10-mini")
    rgb = [Image.fromarray(mini.test.images[i].permute(1, 2, 0).numpy()) for i in range(4)]
    exif = Image.Exif()
    exif[0x0112] = 6
    gray16 = Image.fromarray(np.asarray(rgb[1].convert("L")).astype(np.uint16) * 257)
    rgba = rgb[2].copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    frames = [rgb[0].convert("P"), rgb[1].convert("P")]
    return [
        (".png", _encode(rgb[0], "PNG")),
        (".png", _encode(rgba, "PNG")),
        (".png", _encode(gray16, "PNG")),
        (".png", _encode(rgb[3].convert("P"), "PNG", transparency=0)),
        (".jpg", _encode(rgb[1], "JPEG", quality=90)),
        (".jpg", _encode(rgb[2], "JPEG", progressive=True, exif=exif)),
        (".jpeg", _encode(rgb[3].convert("CMYK"), "JPEG")),
        (".gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])),
        (".webp", _encode(rgb[0], "WEBP", quality=80)),
        (".bmp", _encode(rgb[1], "BMP")),
        (".tif", _encode(rgb[2], "TIFF")),
        (".tiff", _encode(gray16, "TIFF", compression="tiff_deflate")),
    ]


def _huge_dimensions(data: bytes, rng) -> bytes:
    """Declare an enormous width and height in the header of a tiny file, wherever the format keeps them."""
    out = bytearray(data)
    w, h = (int(v) for v in rng.integers(20_000, 2**16, size=2))
    if out[:8] == b"\x89PNG\r\n\x1a\n":
        out[16:24] = struct.pack(">II", w * 1000, h)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))  # a valid CRC: only the size is wrong
    elif out[:3] == b"GIF":
        out[6:10] = struct.pack("<HH", w, h)
    elif out[:2] == b"BM":
        out[18:26] = struct.pack("<ii", w * 100, h)
    elif out[:2] == b"\xff\xd8":
        sof = max(out.find(b"\xff\xc0"), out.find(b"\xff\xc2"))
        if sof > 0:
            out[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    else:
        out[4:12] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    return bytes(out)


def _mutate(data: bytes, ext: str, rng) -> tuple[str, bytes]:
    kind = rng.integers(0, 8)
    out = bytearray(data)
    if kind == 0:  # bit flips anywhere
        for pos in rng.integers(0, len(out), size=rng.integers(1, 9)):
            out[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:  # a span overwritten with random bytes
        start = int(rng.integers(0, len(out)))
        span = rng.integers(0, 256, size=min(int(rng.integers(1, 64)), len(out) - start), dtype=np.uint8)
        out[start : start + len(span)] = span.tobytes()
    elif kind == 2:  # truncated
        out = out[: int(rng.integers(0, len(out)))]
    elif kind == 3:  # header corrupted
        n = min(32, len(out))
        out[:n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif kind == 4:  # huge declared dimensions in a tiny file
        out = bytearray(_huge_dimensions(data, rng))
    elif kind == 5:  # random bytes under an image name
        out = bytearray(rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8).tobytes())
    elif kind == 6:  # empty file
        out = bytearray()
    else:  # bytes of one format under another's extension, with a flip: must still be judged by content
        ext = [".png", ".jpg", ".gif", ".webp", ".bmp", ".tif"][int(rng.integers(0, 6))]
        out[int(rng.integers(0, len(out)))] ^= 0xFF
    return ext, bytes(out)


def _named_in_warnings(err: str) -> set[str]:
    return set(re.findall(r"skipped unreadable image (\S+) \(", err))


def _fuzz(seeds, tmp_path, capsys, cases: int, seed: int):
    rng = np.random.default_rng(seed)
    files = []
    for i in range(cases):
        ext, data = seeds[int(rng.integers(0, len(seeds)))]
        ext, data = _mutate(data, ext, rng) if i % 10 else (ext, data)  # every tenth file intact
        path = tmp_path / f"case{i:04d}{ext}"
        path.write_bytes(data)
        files.append(path)
    labels = list(range(cases))
    start = time.perf_counter()
    signal.alarm(300)  # a hang fails the test instead of stalling the run
    try:
        images, kept = decode_all(files, labels, SIZE)
        skipped = _named_in_warnings(capsys.readouterr().err)
        stream = Split(torch.tensor(labels), stream=StreamingImages(files, labels, SIZE), workers=0)
        streamed = list(stream.batches(torch.arange(cases), 32))
        skipped_streaming = _named_in_warnings(capsys.readouterr().err)
        loaded, refused = {}, set()
        for path, label in zip(files, labels, strict=True):
            try:
                image = load_images([path], PREP)[0]
                assert image.dtype == torch.uint8 and image.shape == (SIZE, SIZE, 3)  # NHWC
                loaded[label] = image.permute(2, 0, 1)
            except UserError as e:
                assert str(path) in str(e) and "\n" not in str(e)
                refused.add(label)
        predicted, errors = {}, set()
        reader = inference_files._Files(files, PREP)  # what `imgcls predict` decodes each file with
        for i in range(cases):
            index, image, error = reader[i]
            assert index == i and (image is None) != (error is None)
            if image is None:
                assert error and "\n" not in error
                errors.add(i)
            else:
                assert image.dtype == torch.uint8 and image.shape == (SIZE, SIZE, 3)
                predicted[i] = image.permute(2, 0, 1)
    finally:
        signal.alarm(0)
    readable = set(kept.tolist())
    assert images.dtype == torch.uint8 and images.shape == (len(readable), 3, SIZE, SIZE)
    assert skipped == skipped_streaming == {str(files[i]) for i in set(labels) - readable}
    assert set(loaded) == readable and refused == set(labels) - readable
    assert set(predicted) == readable and errors == set(labels) - readable
    s_images = torch.cat([b[0] for b in streamed if len(b[0])])
    s_labels = torch.cat([b[1] for b in streamed])
    assert torch.equal(s_labels, kept) and torch.equal(s_images, images)
    assert all(torch.equal(loaded[int(y)], x) for x, y in zip(images, kept, strict=True))
    assert all(torch.equal(predicted[int(y)], x) for x, y in zip(images, kept, strict=True))
    assert {i for i in range(0, cases, 10)} <= readable  # the intact files all decode
    with capsys.disabled():
        print(f"{cases} fuzz cases x 4 paths = {4 * cases} probes, {len(readable)} decodable, "
              f"{time.perf_counter() - start:.1f}s")


def test_fuzzed_images_through_every_decoding_path(seeds, tmp_path, capsys):
    _fuzz(seeds, tmp_path, capsys, cases=200, seed=0)  # the count and time print with -s or -rP


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_fuzzed_images_soak(seeds, tmp_path, capsys, seed):
    _fuzz(seeds, tmp_path, capsys, cases=1000, seed=seed)
