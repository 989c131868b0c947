"""int8 export: quantized from the fp32 file on validation images, proven against it, refused when it
disagrees, and usable like any export."""

import json

import pytest
import torch

from imgcls.cli import main
from imgcls.errors import UserError
from imgcls.export import export_run, quantize
from imgcls.inference.exported import onnx_engine
from imgcls.training.train import fit
from tests.conftest import tiny_config

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory):
    return fit(tiny_config(tiny_folder, tmp_path_factory.mktemp("int8") / "run", epochs=2))


def test_an_int8_export_is_proven_against_fp32_and_predicts(run, tiny_folder, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run), "--format", "onnx", "--quantize", "int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "int8: agreement with fp32" in printed and "model.int8.onnx" in printed
    proof = json.loads((out / "parity.json").read_text())["results"]["int8"]
    assert proof["passed"] and proof["top1_agreement"] >= quantize.MIN_AGREEMENT
    assert set(proof["accuracy"]) == {"val", "test"}  # validation first: its agreement is the proof
    for split in proof["accuracy"].values():
        assert split["fp32"] - split["int8"] <= quantize.MAX_ACCURACY_DROP
    assert set(proof["latency_ms_per_image"]) == {"fp32", "int8"}
    assert "## int8" in (out / "MODEL_CARD.md").read_text()

    engine = onnx_engine(out / quantize.INT8_FILE)  # its metadata is the export's, checked as any
    fp32 = onnx_engine(out / "model.onnx")
    assert engine.classes == fp32.classes and engine.preprocessing == fp32.preprocessing
    session = engine.backend.session
    assert "static int8" in session.get_modelmeta().custom_metadata_map["imgcls.quantization"]
    assert any(node.op_type == "QuantizeLinear" for node in _graph_nodes(out / quantize.INT8_FILE))
    csv = tmp_path / "rows.csv"
    assert main(["predict", str(out / quantize.INT8_FILE), str(tiny_folder / "test"), "--out", str(csv),
                 "--quiet"]) == 0
    assert len(csv.read_text().splitlines()) == 1 + 30


def _graph_nodes(path):
    import onnx

    return onnx.load(str(path)).graph.node


def test_an_int8_file_that_fails_its_proof_is_refused_and_nothing_is_written(run, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "MIN_AGREEMENT", 1.01)  # no int8 file can agree on more than every image
    out = tmp_path / "refused"
    with pytest.raises(UserError, match="int8 export disagrees with fp32.*nothing was written"):
        export_run(run, "onnx", out, quantize="int8", timing=(1, 1))
    assert not out.exists() and not list(tmp_path.glob(".refused*"))


def test_quantize_needs_an_onnx_export(run, tmp_path):
    with pytest.raises(UserError, match="--quantize int8 needs an ONNX export"):
        export_run(run, "safetensors", tmp_path / "st", quantize="int8")
    with pytest.raises(SystemExit) as exit_:  # argparse: not a choice
        main(["export", str(run), "--quantize", "int4"])
    assert exit_.value.code == 2


def test_layer_norms_quantize_without_a_warning_per_layer(export_spec_free_graph, caplog, tmp_path):
    """onnxruntime warned once per LayerNorm (a ViT printed a screenful); the fallback it takes is wanted."""
    import logging

    from imgcls.inference.metadata import parse_spec

    graph, spec_file = export_spec_free_graph
    spec = parse_spec(json.loads(spec_file.read_text()), str(spec_file))
    batches = [torch.randn(2, 16) for _ in range(3)]
    with caplog.at_level(logging.WARNING):
        out = quantize.quantize_int8(graph, tmp_path / "q.onnx", batches, spec)
    assert out.is_file() and not [r for r in caplog.records if "out-of-range" in r.getMessage()]
    assert logging.getLogger().filters == []  # the filter is gone once quantization ends


@pytest.fixture
def export_spec_free_graph(one_epoch_export, tmp_path):
    """A graph of two LayerNorms (input 'images', float 2 x 16) and a real export's model.json for metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "images"
    for i in range(2):
        w = numpy_helper.from_array(torch.randn(16, 16).numpy(), f"w{i}")
        g = numpy_helper.from_array(torch.ones(16).numpy(), f"g{i}")
        b = numpy_helper.from_array(torch.zeros(16).numpy(), f"b{i}")
        inits += [w, g, b]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("LayerNormalization", [f"m{i}", f"g{i}", f"b{i}"], [f"n{i}"], axis=-1)]
        x = f"n{i}"
    nodes.append(helper.make_node("Identity", [x], ["logits"]))
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 16])], inits)
    path = tmp_path / "ln.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, one_epoch_export / "model.json"
