"""inspect(): records, MACs, shares and the table."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnx_perforate


def _model():
    w1 = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "W1")
    w2 = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "W2")
    w3 = numpy_helper.from_array(np.ones((4, 4, 3), np.float32), "W3")
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], name="c1", strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Conv", ["a", "W2"], ["b"], group=2),  # unnamed, grouped
        helper.make_node("Reshape", ["b", "shape"], ["r"], name="flat"),
        helper.make_node("Conv", ["r", "W3"], ["y"], name="conv1d"),
    ]
    shape = numpy_helper.from_array(np.array([1, 4, -1], np.int64), "shape")
    graph = helper.make_graph(nodes, "i", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 15, 15])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2, w3, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_records_and_macs(tmp_path):
    records = onnx_perforate.inspect(_model())
    c1, c2, c3 = records
    assert (c1.name, c1.op_type, c1.output_shape, c1.pads) == ("c1", "Conv", ("N", 8, 8, 8), (1, 1, 1, 1))
    assert c1.macs == 8 * 3 * 9 * 8 * 8
    assert c2.name == "b" and c2.group == 2 and c2.macs == 4 * 4 * 8 * 8
    assert not c3.perforable and "1-D" in c3.reason and c3.macs == 0
    assert abs(c1.share + c2.share - 1) < 1e-9
    assert c1.to_dict()["output_shape"] == ["N", 8, 8, 8]
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    assert [r.name for r in onnx_perforate.inspect(str(path))] == ["c1", "b", "conv1d"]


def test_table():
    table = onnx_perforate.format_table(onnx_perforate.inspect(_model()))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["name", "op", "input"]
    assert "[N, 8, 8, 8]" in table and "n/a: " in table
    assert lines[-1].startswith("3 convolution(s)")
