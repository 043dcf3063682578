"""ONNX tools on perforated models (docs/deployment.md, "Tools"): ORT's quant_pre_process and onnxsim,
on the custom-op and portable forms of the bundled CNN."""

from __future__ import annotations


import onnx
import pytest

import onnx_perforate
from helpers import SAMPLE_MODELS
from onnx_perforate import masks

DOMAIN = onnx_perforate.DOMAIN


@pytest.fixture(scope="module")
def forms():
    original = onnx.load(SAMPLE_MODELS / "fashion_cnn.onnx")
    chosen = {r.name: masks.grid(r.output_shape[2:], 0.5) for r in onnx_perforate.inspect(original) if r.perforable}
    return {"custom": onnx_perforate.rewrite(original, chosen),
            "portable": onnx_perforate.rewrite(original, chosen, portable=True)}


def _custom_outputs(model):
    return [n.output[0] for n in model.graph.node if n.domain == DOMAIN]


@pytest.mark.parametrize("form", ["custom", "portable"])
def test_quant_pre_process_infers_every_custom_output(forms, form, tmp_path):
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    model = forms[form]
    del model.graph.value_info[:]  # everything it knows comes from its own inference
    onnx.save(model, source)
    quant_pre_process(str(source), str(target), skip_optimization=True)
    result = onnx.load(target)
    shapes = {v.name: v.type.tensor_type for v in result.graph.value_info}
    outputs = _custom_outputs(result)
    assert len(outputs) == len(_custom_outputs(forms[form])) > 0
    assert all(name in shapes and shapes[name].HasField("shape") for name in outputs)
    assert len(result.functions) == len(forms[form].functions)


@pytest.mark.parametrize("form", ["custom", "portable"])
def test_onnxsim_keeps_the_custom_ops(forms, form):
    onnxsim = pytest.importorskip("onnxsim", reason="onnxsim is not installed (test extra, Python >= 3.11)")
    simplified, checked = onnxsim.simplify(forms[form])
    assert checked
    assert len(_custom_outputs(simplified)) == len(_custom_outputs(forms[form]))
    onnx.checker.check_model(simplified, full_check=True)
