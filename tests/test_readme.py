"""The README's Python blocks, run as they are written, on a small export whose crop_pct is not 1: a snippet
cannot drift from the code (the ONNX one once resized as if crop_pct were 1 and gave other labels)."""

import contextlib
import io
import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.cli import main
from imgcls.inference.files import load_images
from imgcls.training.train import fit
from tests.conftest import tiny_config

README = Path(__file__).parents[1] / "README.md"
EXIF_ORIENTATION = 0x0112


def python_blocks() -> list[str]:
    text = README.read_text()
    return [textwrap.dedent(block) for block in re.findall(r"^ *```python\n(.*?)^ *```", text, re.M | re.S)]


def block_using(words: str) -> str:
    (block,) = [b for b in python_blocks() if words in b]
    return block


@pytest.fixture(scope="module")
def export(tiny_folder, tmp_path_factory):
    """runs/vit/export under a fresh folder, as the README names it: efficientnet_lite0's own weights and
    preprocessing (crop_pct 0.875) at 64 px, the head trained for one epoch on the features."""
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("readme")
    run = fit(tiny_config(tiny_folder, root / "run", model="efficientnet_lite0", img_size=64, pretrained=True,
                          strategy="feature-extract", cache_features=True, epochs=1))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(run), "--out", str(root / "runs" / "vit" / "export")]) == 0
    return root / "runs" / "vit" / "export"


def photos(mini, folder: Path) -> list[Path]:
    """Non-square JPEGs of test images, one of them stored on its side with an EXIF orientation tag."""
    paths = []
    for i, (width, height) in enumerate([(97, 61), (61, 97), (120, 80), (80, 80)]):
        img = Image.fromarray(mini.test.images[i].permute(1, 2, 0).numpy()).resize((width, height), Image.BICUBIC)
        path = folder / f"photo{i}.jpg"
        if i == 2:
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = 6  # the viewer turns it 90 degrees clockwise
            img.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=90)
        else:
            img.save(path, quality=90)
        paths.append(path)
    return paths


def run_block(block: str, cwd: Path, monkeypatch) -> tuple[dict, str]:
    """exec `block` in `cwd`: (its variables, what it printed)."""
    monkeypatch.chdir(cwd)
    names, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(README), "exec"), names)  # noqa: S102 - the README's own code
    return names, out.getvalue().strip()


def test_the_onnx_snippet_sees_the_pixels_and_gives_the_labels_of_imgcls_predict(export, mini, tmp_path,
                                                                                   monkeypatch):
    block = block_using("onnxruntime")
    spec = json.loads((export / "model.json").read_text())["preprocessing"]
    assert spec["crop_pct"] == 0.875
    from imgcls.data.preprocessing import Preprocessing

    prep = Preprocessing(spec["img_size"], tuple(spec["mean"]), tuple(spec["std"]), spec["crop_pct"])
    for photo in photos(mini, tmp_path):
        (export / "cat.jpg").write_bytes(photo.read_bytes())
        names, printed = run_block(block, export, monkeypatch)
        assert np.array_equal(names["x"], load_images([photo], prep).numpy()), photo.name  # the very pixels
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["predict", str(export / "model.onnx"), str(photo), "--json"]) == 0
        assert printed == json.loads(out.getvalue())[0]["label"], photo.name


def test_the_safetensors_snippet_loads_the_export_and_scores_as_predict(export, mini, tmp_path, monkeypatch):
    block = block_using("imgcls.load_model")
    root = export.parents[2]
    photo = photos(mini, tmp_path)[0]
    (root / "cat.jpg").write_bytes(photo.read_bytes())
    names, _ = run_block(block, root, monkeypatch)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["predict", str(export), str(photo), "--json"]) == 0
    row = json.loads(out.getvalue())[0]
    model = names["model"]
    assert model.imgcls["classes"][int(names["logits"].argmax())] == row["label"]
    assert isinstance(names["logits"], torch.Tensor) and names["logits"].shape == (1, len(model.imgcls["classes"]))
