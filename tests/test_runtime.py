"""onnx_perforate.runtime: the model's input, the timing input, sessions, interleaved timing and peak
memory in a subprocess."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_perforate import runtime
from onnx_perforate.errors import DataError


def _relu_model(dims=(1, 3, 8, 8), weight_as_input=False):
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))]
    if weight_as_input:  # IR 3 style: every initializer is also a graph input
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 1, 1]))
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
                              "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_model_input_skips_initializers_and_reports_dims():
    spec = runtime.model_input(_relu_model(("N", 3, 8, 8), weight_as_input=True))
    assert spec == ("x", (None, 3, 8, 8)) and spec.fixed_batch is None
    assert runtime.model_input(_relu_model()).fixed_batch == 1


def test_model_input_wants_exactly_one_input():
    model = _relu_model()
    model.graph.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1]))
    with pytest.raises(DataError, match=r"one input; this one has \['x', 'z'\]"):
        runtime.model_input(model)


def test_timing_input_is_uniform_and_a_static_batch_wins():
    name, x = runtime.timing_input(_relu_model(), batch=4)
    assert name == "x" and x.shape == (1, 3, 8, 8) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() < 1 and x.std() > 0.2
    _, x = runtime.timing_input(_relu_model(("N", 3, 8, 8)), batch=4)
    assert x.shape == (4, 3, 8, 8)
    np.testing.assert_array_equal(x, runtime.timing_array((4, 3, 8, 8)))
    with pytest.raises(DataError, match="dynamic non-batch"):
        runtime.timing_input(_relu_model(("N", 3, "H", 8)))


class RecordingSession:
    """Stands in for an ORT session: appends its name to ``calls`` at every run."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def run(self, outputs, feeds):
        self.calls.append(self.name)


def test_time_interleaved_takes_turns():
    calls = []
    times = runtime.time_interleaved([RecordingSession("a", calls), RecordingSession("b", calls)], {}, repeats=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    for kind in (times.wall, times.cpu):
        assert [len(t) for t in kind] == [3, 3] and all(v >= 0 for t in kind for v in t)


def test_time_interleaved_runs_per_turn_times_the_steady_state():
    calls = []
    sessions = [RecordingSession("a", calls), RecordingSession("b", calls)]
    times = runtime.time_interleaved(sessions, {}, repeats=5, warmup=1, runs_per_turn=3)
    # each turn: one untimed run, then two timed ones; the last turn times only what is left
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2
    assert [len(t) for t in times.wall] == [5, 5]
    with pytest.raises(ValueError, match="runs_per_turn"):
        runtime.time_interleaved(sessions, {}, repeats=1, runs_per_turn=0)


def test_time_interleaved_feeds_each_session_its_own_input():
    fed = []

    class Fake:
        def run(self, outputs, feeds):
            fed.append(feeds["x"])

    runtime.time_interleaved([Fake(), Fake()], [{"x": 1}, {"x": 2}], repeats=2, warmup=1)
    assert fed == [1, 2] + [1, 2] * 2
    with pytest.raises(ValueError, match="1 feeds for 2 sessions"):
        runtime.time_interleaved([Fake(), Fake()], [{"x": 1}], repeats=1)


def test_session_without_the_custom_ops_runs_standard_graphs():
    session = runtime.session(_relu_model(), 1, custom_ops=False)
    x = np.full((1, 3, 8, 8), -1.0, np.float32)
    x[0, :, 0, 0] = 2.0
    y = session.run(None, {"x": x})[0]
    assert y[0, 0, 0, 0] == 6.0 and y[0, 0, 1, 1] == 0.0


def test_peak_memory_runs_in_a_subprocess(tmp_path, require_library):
    path = tmp_path / "m.onnx"
    onnx.save(_relu_model((1, 3, 64, 64)), path)
    measured = runtime.peak_memory(path, 1)
    assert set(measured) == {"session_bytes", "run_peak_bytes", "resettable"}
    assert measured["session_bytes"] > 1 << 20 and measured["run_peak_bytes"] >= 0
    assert runtime.peak_memory(path, 1, disabled_optimizers=["NchwcTransformer"]) is not None


def test_peak_memory_failure_is_a_warning_not_a_crash(tmp_path, caplog):
    assert runtime.peak_memory(tmp_path / "missing.onnx", 1) is None
    assert "peak memory not measured" in caplog.text


def test_cpu_description_names_the_simd_level_and_vnni():
    avx512 = "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 fma avx512f avx512bw avx512_vnni\n\n" \
             "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    described = runtime.cpu_description(avx512)
    assert described.startswith("Some Xeon, AVX-512, VNNI, ") and described.endswith(" cores")
    assert runtime.cpu_description("model name\t: AMD EPYC\nflags\t: fpu avx avx2 fma\n").startswith(
        "AMD EPYC, AVX2, no VNNI, ")
    assert runtime.cpu_description("model name\t: Old\nflags\t: fpu sse4_2\n").startswith("Old, no AVX2, no VNNI")
    assert runtime.cpu_description("").endswith(" cores")  # no /proc/cpuinfo: the platform's name
    assert runtime.cpu_description().endswith(" cores")


def test_cpu_flags_are_the_ones_cpu_description_reads():
    flags = runtime.cpu_flags()
    assert isinstance(flags, frozenset)
    described = runtime.cpu_description()
    assert ("avx512f" in flags) == (", AVX-512, " in described)
    assert ("avx2" in flags and "avx512f" not in flags) == (", AVX2, " in described)
