"""The Python-op fallback agrees with the reference evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper

from onnx_perforate import DOMAIN, masks, ops
from onnx_perforate.rewrite import rewrite

pytest.importorskip("onnxruntime_extensions", reason="onnxruntime-extensions (the fallback's dependency) is not installed")
from onnx_perforate import fallback  # noqa: E402
from helpers import bn, chained_perforated_convs, conv_model, unary, x_for  # noqa: E402


@pytest.mark.parametrize("bias", [True, False])
def test_python_ops_match_reference(bias):
    model = conv_model(after=[bn, unary("LeakyRelu", alpha=0.1)], bias=bias, strides=(2, 1))
    out = rewrite(model, {"conv": masks.uniform((6, 12), 0.4, seed=1)})
    converted = fallback.to_python_op_model(out)
    domain = fallback.python_domain()
    custom = [n for n in converted.graph.node if n.domain == domain]
    assert {n.op_type for n in custom} == {"PerforatedConv", "NNInterpolate"}
    assert not any(n.domain == DOMAIN for n in converted.graph.node)
    conv = next(n for n in custom if n.op_type == "PerforatedConv")
    assert conv.input[2], "a missing bias is replaced by a zero initializer"
    (attr,) = conv.attribute
    assert json.loads(helper.get_attribute_value(attr))["activation"] == "LeakyRelu"
    x = x_for(model)
    want = ops.reference_evaluator(out).run(None, {"x": x})[0]
    got = fallback.fallback_session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fallback_warns(caplog):
    out = rewrite(conv_model(), {"conv": np.ones((12, 12), bool)})
    with caplog.at_level("WARNING"):
        fallback.fallback_session(out)
    assert "slow Python ops" in caplog.text


def test_compact_models_run_in_the_fallback():
    """A perforated conv reading a compact input (X_index) runs as its own fixed-arity Python op."""
    out = rewrite(*chained_perforated_convs())
    converted = fallback.to_python_op_model(out)
    assert fallback.COMPACT_INPUT_OP in {n.op_type for n in converted.graph.node}
    x = np.random.default_rng(0).uniform(0.1, 1.0, (2, 4, 10, 10)).astype(np.float32)
    want = ops.reference_evaluator(out).run(None, {"x": x})[0]
    got = fallback.fallback_session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
