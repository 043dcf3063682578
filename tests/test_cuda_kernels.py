"""Tests of the CUDA kernels and of the ORT CUDA custom ops.

* ``gpu`` tests: the kernels of ``libonnx_perforate_cuda_kernels.so`` called through ctypes on PyTorch
  CUDA tensors, against ``torch.nn.functional.conv2d`` (float64) followed by the same mask selection and
  gather; and a 2-node model (PerforatedConv + NNInterpolate) run by ONNX Runtime's CUDA execution
  provider with ``libonnx_perforate_ops_cuda.so``, against the CPU kernels. Each skips, saying why, when
  torch with CUDA, a GPU, onnxruntime-gpu or the built libraries are missing.
* CPU-side tests (no GPU needed): the CUDA libraries were built when nvcc is available, export their
  entry points, keep the CPU library free of CUDA, and the host helpers (gather table, argument checks)
  behave.

The kernels library is ``onnx_perforate.cuda_kernels_library_path()``: ``ONNX_PERFORATE_CUDA_KERNELS``
(a file), else the package's ``lib`` directory, else next to ``onnx_perforate.cuda_library_path()``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from onnx_perforate import LibraryNotFoundError, cuda_kernels, cuda_kernels_library_path
from onnx_perforate.cuda_kernels import ACTIVATIONS, conv_launch, device_conv_config, gather_table
from onnx_perforate.ops import conv_output_size, nearest_index

from helpers import REPO

KERNELS_NAME = "libonnx_perforate_cuda_kernels.so"
OPS_CUDA_NAME = "libonnx_perforate_ops_cuda.so"
OPS_CPU_NAME = "libonnx_perforate_ops.so"
CUDA_ERROR_INVALID_VALUE = 1


# --- locating and loading the libraries --------------------------------------------------------------


def _package_lib_dir() -> Path:
    return REPO / "onnx_perforate" / "lib"


def _candidate_dirs() -> list[Path]:
    dirs = []
    try:
        import onnx_perforate

        path = onnx_perforate.cuda_library_path()
        if path:
            dirs.append(Path(path).parent)
        dirs.append(Path(onnx_perforate.__file__).resolve().parent / "lib")
    except Exception:  # the package may not import (no onnxruntime): fall back to the source tree
        pass
    dirs.append(_package_lib_dir())
    dirs += sorted(REPO.glob("build/*/cuda")) + sorted(REPO.glob("build/*"))
    return dirs


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernels_path() -> Path:
    try:
        path = cuda_kernels_library_path()
    except LibraryNotFoundError as error:  # ONNX_PERFORATE_CUDA_KERNELS names no file
        pytest.skip(str(error))
    if path is None:
        pytest.skip(f"{KERNELS_NAME} not built (build with ONNX_PERFORATE_CUDA=ON, or set ONNX_PERFORATE_CUDA_KERNELS)")
    return Path(path)


@pytest.fixture(scope="module")
def kernels(kernels_path):
    return cuda_kernels.load(str(kernels_path))


@pytest.fixture(scope="module")
def torch_cuda():
    try:
        import torch
    except ImportError:
        pytest.skip("PyTorch is not installed (needed as the GPU reference)")
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False: no CUDA GPU or driver (or a CPU-only torch build)")
    # The reference must be exact: float64 convolutions, no TF32 anywhere.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch


class Runner:
    """The kernels on torch tensors, on torch's current stream."""

    def __init__(self, lib, torch):
        self.lib, self.torch = lib, torch

    def _check(self, status, what):
        if status:
            raise RuntimeError(f"{what}: CUDA error {status} ({self.lib.onnx_perforate_cuda_error_string(status).decode()})")

    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream

    def perforated_conv(self, x, w, b, table, group, activation="", alpha=0.01, clip_min=-3.4e38, clip_max=3.4e38):
        n, c, h, wd = x.shape
        m, _, kh, kw = w.shape
        count = table.shape[1]
        yc = self.torch.empty((n, m, count), device=x.device, dtype=self.torch.float32)
        self._check(self.lib.onnx_perforate_cuda_perforated_conv(
            x.data_ptr(), w.data_ptr(), b.data_ptr() if b is not None else None, table.data_ptr(), n, c, h, wd, m,
            group, kh, kw, count, ACTIVATIONS[activation], alpha, clip_min, clip_max, yc.data_ptr(), self.stream()),
            "perforated_conv")
        return yc

    def nn_interpolate(self, yc, index32):
        n, m, count = yc.shape
        ho, wo = index32.shape
        y = self.torch.empty((n, m, ho, wo), device=yc.device, dtype=self.torch.float32)
        self._check(self.lib.onnx_perforate_cuda_nn_interpolate(
            yc.data_ptr(), index32.data_ptr(), n * m, count, ho * wo, y.data_ptr(), self.stream()), "nn_interpolate")
        return y


@pytest.fixture(scope="module")
def runner(kernels, torch_cuda):
    return Runner(kernels, torch_cuda)


def reference(torch, x, w, b, stride, pads, dilation, group, activation, alpha, clip_min, clip_max, mask):
    import torch.nn.functional as F

    top, left, bottom, right = pads
    xp = F.pad(x.double(), (left, right, top, bottom))  # asymmetric pads: pad explicitly
    y = F.conv2d(xp, w.double(), None if b is None else b.double(), stride=stride, dilation=dilation, groups=group)
    if activation == "Relu":
        y = torch.relu(y)
    elif activation == "LeakyRelu":
        y = torch.where(y < 0, alpha * y, y)
    elif activation == "Clip":
        y = y.clamp(clip_min, clip_max)
    flat = torch.as_tensor(np.flatnonzero(mask), device=x.device)
    return y, y.reshape(y.shape[0], y.shape[1], -1)[:, :, flat]


def assert_close(torch, actual, expected, rtol=1e-4):
    expected = expected.float()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def make_mask(kind: str, shape, rng) -> np.ndarray:
    ho, wo = shape
    if kind == "ones":
        return np.ones(shape, np.uint8)
    if kind == "single":
        m = np.zeros(shape, np.uint8)
        m[rng.integers(ho), rng.integers(wo)] = 1
        return m
    if kind == "last":
        m = np.zeros(shape, np.uint8)
        m[-1, -1] = 1
        return m
    if kind == "grid":
        m = np.zeros(shape, np.uint8)
        m[::2, ::2] = 1
        return m
    rate = float(kind.split("=")[1])  # "r=0.5": uniform random, that fraction skipped (at least one kept)
    keep = max(1, int(round((1 - rate) * ho * wo)))
    m = np.zeros(ho * wo, np.uint8)
    m[rng.choice(ho * wo, keep, replace=False)] = 1
    return m.reshape(shape)


# (N, C, M, H, W, kh, kw, stride, pads [t, l, b, r], dilation, group, activation, bias, mask kind)
CONV_CASES = [
    (2, 16, 32, 12, 12, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "", True, "ones"),
    (1, 16, 32, 12, 12, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "Relu", True, "r=0.5"),
    (3, 64, 48, 9, 11, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, "", False, "r=0.75"),
    (2, 32, 64, 15, 15, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 2, "LeakyRelu", True, "grid"),
    (5, 12, 40, 13, 17, 3, 3, (1, 1), (0, 1, 2, 1), (2, 2), 1, "", True, "r=0.5"),  # dilation, asymmetric pads
    (1, 20, 36, 16, 16, 5, 5, (2, 1), (2, 1, 2, 0), (1, 1), 1, "Clip", False, "single"),
    (2, 3, 32, 30, 30, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1, "Relu", True, "r=0.5"),  # stem-like, 49 taps
    (1, 8, 32, 20, 20, 9, 9, (1, 1), (4, 4, 4, 4), (1, 1), 1, "", True, "r=0.75"),  # 81 taps: global offsets
    (3, 64, 128, 33, 33, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "", True, "ones"),  # K odd (small tiles)
    (2, 64, 64, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "LeakyRelu", True, "last"),
    (3, 256, 256, 28, 28, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "", True, "r=0.5"),
]

# Cases meant to exercise one kernel, with the kernel each must select on an H200 (132 SMs, 2 big-tile
# blocks per SM): checked on the CPU by test_cases_select_the_kernel_they_are_meant_for, and on a GPU
# with the device's own numbers (big tiles) before they run.
H200 = (132, 2)
KERNEL_CASES = {
    "direct": [
        (4, 24, 24, 14, 14, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 24, "Relu", True, "r=0.5"),  # depthwise
        (2, 8, 16, 10, 10, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 8, "", True, "ones"),  # channel multiplier 2
        (2, 32, 16, 10, 10, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4, "Clip", True, "r=0.5"),  # few outputs per group
    ],
    "small tiles": [
        # few outputs per group but many inputs: a GEMM, not the direct kernel
        (2, 128, 16, 10, 10, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, "Relu", True, "r=0.5"),
    ],
    "big tiles": [
        (8, 16, 64, 72, 72, 7, 7, (1, 1), (3, 3, 3, 3), (1, 1), 1, "", True, "ones"),  # global offsets
        (6, 64, 128, 56, 56, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "Relu", True, "ones"),  # K % 4 == 0
        # K odd and a partial M tile (96 = 64 + 32; 80 = 64 + 16 per group)
        (16, 32, 96, 47, 47, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "LeakyRelu", True, "ones"),
        (12, 64, 160, 45, 45, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, "Clip", False, "r=0.4"),
    ],
    "split": [
        (1, 256, 64, 7, 7, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "Relu", True, "ones"),
        (1, 384, 96, 13, 13, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "Clip", True, "r=0.75"),  # perforated
    ],
}
CONV_CASES += [case for cases in KERNEL_CASES.values() for case in cases]


def _mask_for(case, rng) -> np.ndarray:
    n, c, m, h, w, kh, kw, stride, pads, dilation, group, activation, with_bias, mask_kind = case
    return make_mask(mask_kind, conv_output_size((h, w), (kh, kw), stride, pads, dilation), rng)


def _kernel_choice(lib, case, sms, big_blocks_per_sm) -> tuple[str, int]:
    n, c, m, h, w, kh, kw, stride, pads, dilation, group, activation, with_bias, mask_kind = case
    count = int(_mask_for(case, np.random.default_rng(0)).sum())  # every mask kind fixes its count
    return conv_launch(lib, n, c, m, group, kh, kw, count, sms, big_blocks_per_sm)


def _case_id(case):
    n, c, m, h, w, kh, kw, stride, pads, dil, group, act, bias, mask = case
    return f"n{n}-c{c}-m{m}-{h}x{w}-k{kh}x{kw}-s{stride[0]}{stride[1]}-p{''.join(map(str, pads))}-d{dil[0]}-g{group}-{act or 'none'}-{'b' if bias else 'nob'}-{mask}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_perforated_conv_matches_torch(runner, torch_cuda, case):
    torch = torch_cuda
    n, c, m, h, w, kh, kw, stride, pads, dilation, group, activation, with_bias, mask_kind = case
    rng = np.random.default_rng(zlib.crc32(_case_id(case).encode()))  # stable across processes
    gen = torch.Generator(device="cuda").manual_seed(int(rng.integers(2**31)))
    x = torch.randn((n, c, h, w), device="cuda", generator=gen)
    weight = torch.randn((m, c // group, kh, kw), device="cuda", generator=gen) / np.sqrt(c // group * kh * kw)
    bias = torch.randn((m,), device="cuda", generator=gen) if with_bias else None
    alpha, clip_min, clip_max = 0.2, -0.5, 0.75
    mask = _mask_for(case, rng)
    if case in KERNEL_CASES["big tiles"]:  # the case must test what it says on this GPU too
        assert _kernel_choice(runner.lib, case, *device_conv_config(runner.lib))[0] == "big tiles"
    table = torch.from_numpy(gather_table(runner.lib, h, w, kh, kw, stride, pads, dilation, mask)).cuda()

    yc = runner.perforated_conv(x, weight, bias, table, group, activation, alpha, clip_min, clip_max)
    _, expected = reference(torch, x, weight, bias, stride, pads, dilation, group, activation, alpha, clip_min,
                            clip_max, mask)
    torch.cuda.synchronize()
    assert yc.shape == (n, m, int(mask.sum()))
    assert_close(torch, yc, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("rate", [0.0, 0.5, 0.75])
def test_perforated_conv_then_interpolate(runner, torch_cuda, batch, rate):
    torch = torch_cuda
    rng = np.random.default_rng(int(batch * 100 + rate * 10))
    c, m, h, w = 32, 48, 20, 18
    x = torch.randn((batch, c, h, w), device="cuda")
    weight = torch.randn((m, c, 3, 3), device="cuda") * 0.1
    bias = torch.randn((m,), device="cuda")
    mask = make_mask(f"r={rate}", (h, w), rng)
    table = torch.from_numpy(gather_table(runner.lib, h, w, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), mask)).cuda()
    index = nearest_index(mask)
    index32 = torch.from_numpy(index.astype(np.int32)).cuda()

    y = runner.nn_interpolate(runner.perforated_conv(x, weight, bias, table, 1, "Relu"), index32)
    _, yc_ref = reference(torch, x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1, "Relu", 0, 0, 0, mask)
    expected = yc_ref[:, :, torch.from_numpy(index.reshape(-1)).cuda()].reshape(batch, m, h, w)
    torch.cuda.synchronize()
    assert_close(torch, y, expected)
    if rate == 0.0:  # nothing skipped: the plain convolution
        full, _ = reference(torch, x, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1, "Relu", 0, 0, 0, mask)
        assert_close(torch, y, full)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 7, 5, 6), (4, 64, 100, 28, 28), (3, 100000, 2, 1, 3)])
def test_nn_interpolate_matches_gather(runner, torch_cuda, shape):
    torch = torch_cuda
    n, m, count, ho, wo = shape
    yc = torch.randn((n, m, count), device="cuda")
    index = torch.randint(0, count, (ho, wo), device="cuda")
    y = runner.nn_interpolate(yc, index.to(torch.int32))
    torch.cuda.synchronize()
    assert torch.equal(y, yc[:, :, index.reshape(-1)].reshape(n, m, ho, wo))  # a copy: exact


@pytest.mark.gpu
def test_kernels_use_the_given_stream(runner, torch_cuda):
    """Work goes to the caller's stream: results are ready after syncing that stream only."""
    torch = torch_cuda
    stream = torch.cuda.Stream()
    mask = np.ones((16, 16), np.uint8)
    table = torch.from_numpy(gather_table(runner.lib, 16, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), mask)).cuda()
    x = torch.randn((2, 32, 16, 16), device="cuda")
    weight = torch.randn((64, 32, 3, 3), device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        yc = runner.perforated_conv(x, weight, None, table, 1)
    stream.synchronize()
    _, expected = reference(torch, x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1, "", 0, 0, 0, mask)
    assert_close(torch, yc, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["", "Relu", "Clip"])
@pytest.mark.parametrize("empty", ["C=0", "H=0"])
def test_empty_input_gives_activation_of_bias(runner, torch_cuda, empty, activation):
    """ONNX Runtime passes NULL for zero-element tensors: no input channels (X and W empty) or an input
    plane with no pixels (X empty, every tap reads padding) both give activation(bias)."""
    torch = torch_cuda
    n, m, c = 2, 8, (0 if empty == "C=0" else 4)
    h, w = (5, 6) if empty == "C=0" else (0, 3)
    pads = (2, 2, 2, 2)
    mask = make_mask("r=0.5", conv_output_size((h, w), (3, 3), (1, 1), pads, (1, 1)), np.random.default_rng(1))
    table = torch.from_numpy(gather_table(runner.lib, h, w, 3, 3, (1, 1), pads, (1, 1), mask)).cuda()
    count = table.shape[1]
    weight = torch.randn((m, c, 3, 3), device="cuda")
    bias = torch.randn((m,), device="cuda")
    yc = torch.full((n, m, count), float("nan"), device="cuda")
    status = runner.lib.onnx_perforate_cuda_perforated_conv(
        None, weight.data_ptr() if c else None, bias.data_ptr(), table.data_ptr(), n, c, h, w, m, 1, 3, 3, count,
        ACTIVATIONS[activation], 0.0, -0.25, 0.25, yc.data_ptr(), runner.stream())
    assert status == 0, runner.lib.onnx_perforate_cuda_error_string(status).decode()
    expected = bias.reshape(1, m, 1).expand(n, m, count)
    if activation == "Relu":
        expected = torch.relu(expected)
    elif activation == "Clip":
        expected = expected.clamp(-0.25, 0.25)
    torch.cuda.synchronize()
    assert torch.equal(yc, expected)


# --- ONNX Runtime CUDA execution provider ------------------------------------------------------------


def _session_providers(ort) -> list[str]:
    """The providers a one-node session really got when asked for CUDA first."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:  # noqa: BLE001  an EP that fails to load can also raise
        return []
    return session.get_providers()


def _ort_cuda():
    try:
        import onnxruntime as ort
    except ImportError:
        pytest.skip("onnxruntime is not installed")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu); "
                    f"providers: {ort.get_available_providers()}")
    # get_available_providers() lists what the build contains, not what loads: a CUDA EP whose CUDA or
    # cuDNN libraries are missing falls back to the CPU with a warning. Ask a tiny session instead.
    if "CUDAExecutionProvider" not in _session_providers(ort):
        pytest.skip(f"onnxruntime {ort.__version__} lists CUDAExecutionProvider but it does not load here (its CUDA "
                    f"or cuDNN libraries are missing?); a session got: {_session_providers(ort)}")
    try:
        import onnx_perforate
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"onnx_perforate does not import: {e}")
    if onnx_perforate.cuda_library_path() is None:
        pytest.skip(f"{OPS_CUDA_NAME} not built (or set ONNX_PERFORATE_CUDA_LIBRARY)")
    if not onnx_perforate.has_library():
        pytest.skip(f"{OPS_CPU_NAME} not built (or set ONNX_PERFORATE_LIBRARY)")
    return ort, onnx_perforate


def _two_node_model(c, m, h, w, kernel, stride, pads, dilation, group, activation, mask, seed):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((m, c // group, kernel, kernel)) / np.sqrt(c // group * kernel**2)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    index = nearest_index(mask)
    attrs = dict(kernel_shape=[kernel, kernel], strides=list(stride), pads=list(pads), dilations=list(dilation),
                 group=group)
    if activation:
        attrs["activation"] = activation
        attrs.update(alpha=0.1, clip_min=-0.5, clip_max=0.5)
    nodes = [
        helper.make_node("PerforatedConv", ["X", "W", "B", "mask"], ["Yc"], name="pconv", domain="onnx_perforate",
                         **attrs),
        helper.make_node("NNInterpolate", ["Yc", "index"], ["Y"], name="interp", domain="onnx_perforate"),
    ]
    ho, wo = mask.shape
    graph = helper.make_graph(
        nodes, "perforated",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", m, ho, wo]),
         helper.make_tensor_value_info("Yc", TensorProto.FLOAT, ["N", m, int(mask.sum())])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B"),
         numpy_helper.from_array(mask.astype(bool), "mask"), numpy_helper.from_array(index, "index")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("onnx_perforate", 1)])
    model.ir_version = 8
    return model.SerializeToString()


ORT_CASES = [
    # (C, M, H, W, kernel, stride, pads, dilation, group, activation, mask kind)
    (16, 32, 20, 20, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "Relu", "r=0.5"),
    (32, 32, 15, 17, 3, (2, 2), (1, 0, 1, 2), (1, 1), 32, "", "ones"),
    (24, 48, 14, 14, 3, (1, 1), (2, 2, 2, 2), (2, 2), 3, "Clip", "r=0.75"),
    (64, 96, 13, 13, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "LeakyRelu", "single"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", ORT_CASES, ids=lambda c: f"c{c[0]}-m{c[1]}-g{c[8]}-{c[9] or 'none'}-{c[10]}")
def test_ort_cuda_provider_matches_cpu(case):
    ort, onnx_perforate = _ort_cuda()
    c, m, h, w, kernel, stride, pads, dilation, group, activation, mask_kind = case
    rng = np.random.default_rng(7)
    ho, wo = conv_output_size((h, w), (kernel, kernel), stride, pads, dilation)
    mask = make_mask(mask_kind, (ho, wo), rng)
    model = _two_node_model(c, m, h, w, kernel, stride, pads, dilation, group, activation, mask, seed=3)

    cpu = ort.InferenceSession(model, onnx_perforate.session_options(), providers=["CPUExecutionProvider"])
    gpu_options = onnx_perforate.session_options(cuda=True)
    # Fail instead of silently running our nodes on the CPU: both must be assigned to the CUDA EP.
    gpu_options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    gpu = ort.InferenceSession(model, gpu_options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    for batch in (1, 3, 2):  # several batch sizes through one session: the cached tables are reused
        x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
        y_cpu, yc_cpu = cpu.run(None, {"X": x})
        for _ in range(2):
            y_gpu, yc_gpu = gpu.run(None, {"X": x})
            np.testing.assert_allclose(yc_gpu, yc_cpu, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(yc_cpu).max()))
            np.testing.assert_allclose(y_gpu, y_cpu, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(y_cpu).max()))


@pytest.mark.gpu
@pytest.mark.parametrize("c, h, w, pads", [(0, 6, 5, (1, 1, 1, 1)), (4, 0, 3, (2, 2, 2, 2))], ids=["C=0", "H=0"])
def test_ort_cuda_provider_empty_input_gives_activation_of_bias(c, h, w, pads):
    """Through ORT, whose zero-element X (and W when C = 0) arrive as NULL pointers."""
    ort, onnx_perforate = _ort_cuda()
    import onnx
    from onnx import numpy_helper

    mask = np.ones(conv_output_size((h, w), (3, 3), (1, 1), pads, (1, 1)), np.uint8)
    model = _two_node_model(max(c, 1), 6, h, w, 3, (1, 1), pads, (1, 1), 1, "Relu", mask, seed=5)
    model = onnx.load_from_string(model)
    for init in model.graph.initializer:  # C = 0: W becomes [M, 0, 3, 3]
        if init.name == "W" and c == 0:
            init.CopyFrom(numpy_helper.from_array(np.zeros((6, 0, 3, 3), np.float32), "W"))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = c
    bias = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "B")
    options = onnx_perforate.session_options(cuda=True)
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    gpu = ort.InferenceSession(model.SerializeToString(), options,
                               providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    y, yc = gpu.run(None, {"X": np.zeros((2, c, h, w), np.float32)})
    np.testing.assert_array_equal(yc, np.broadcast_to(np.maximum(bias, 0)[None, :, None], yc.shape))
    np.testing.assert_array_equal(y, np.broadcast_to(np.maximum(bias, 0)[None, :, None, None], y.shape))


@pytest.mark.gpu
def test_ort_cuda_provider_reports_bad_index():
    ort, onnx_perforate = _ort_cuda()
    import onnx

    mask = np.ones((8, 8), np.uint8)
    model = onnx.load_from_string(_two_node_model(4, 4, 8, 8, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, "", mask, 0))
    for init in model.graph.initializer:
        if init.name == "index":
            values = np.frombuffer(init.raw_data, dtype=np.int64).copy()
            values[5] = 64  # K = 64: out of range
            init.raw_data = values.tobytes()
    gpu = ort.InferenceSession(model.SerializeToString(), onnx_perforate.session_options(cuda=True),
                               providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(Exception, match="NNInterpolate node 'interp'.*index"):
        gpu.run(None, {"X": np.zeros((1, 4, 8, 8), np.float32)})


# --- CPU-side checks (no GPU needed) ------------------------------------------------------------------


def test_cuda_libraries_built_when_nvcc_present():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA libraries are optional and not expected here")
    if os.environ.get("ONNX_PERFORATE_CUDA_KERNELS"):
        directory = Path(os.environ["ONNX_PERFORATE_CUDA_KERNELS"]).parent
    else:
        found = [d for d in _candidate_dirs() if (d / OPS_CPU_NAME).is_file() or (d / KERNELS_NAME).is_file()]
        if not found:
            pytest.skip(f"no built onnx_perforate libraries found (looked in {[str(d) for d in _candidate_dirs()]}); "
                        "build with `pip install .` first")
        directory = found[0]
    # A build without ORT headers (ONNX_PERFORATE_ORT_OPS=AUTO/OFF) has the kernels library alone.
    ort_built = (directory / OPS_CPU_NAME).is_file() or (directory.parent / OPS_CPU_NAME).is_file()
    expected = (KERNELS_NAME, OPS_CUDA_NAME) if ort_built else (KERNELS_NAME,)
    missing = [name for name in expected if not (directory / name).is_file()]
    if missing == list(expected):
        pytest.skip(f"{directory} holds a build without CUDA although {nvcc} exists: it was configured with "
                    "ONNX_PERFORATE_CUDA=OFF, or CMake did not find the CUDA compiler (check the build log for "
                    "'no CUDA compiler found'); rebuild with ONNX_PERFORATE_CUDA=ON pip install . to require it")
    assert not missing, f"partial CUDA build in {directory}: {missing} missing"


def test_kernels_library_configures_without_ort_headers(tmp_path):
    """A machine with nvcc but no ONNX Runtime headers (and no network) can still build the kernels
    library: CMake asks for no header with ONNX_PERFORATE_ORT_OPS=OFF and plans that target alone."""
    cmake, nvcc = shutil.which("cmake"), shutil.which("nvcc")
    if cmake is None or nvcc is None:
        pytest.skip("needs cmake and nvcc on PATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONNXRUNTIME_")}
    env["HOME"] = str(tmp_path)  # no header cache
    configure = subprocess.run(
        [cmake, "-S", str(REPO / "custom_ops"), "-B", str(tmp_path / "build"), "-DONNX_PERFORATE_CUDA=ON",
         "-DONNX_PERFORATE_ORT_OPS=OFF", f"-DCMAKE_CUDA_COMPILER={nvcc}"],
        capture_output=True, text=True, env=env, timeout=300)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    assert "ONNX Runtime headers" not in configure.stdout
    targets = subprocess.run([cmake, "--build", str(tmp_path / "build"), "--target", "help"], capture_output=True,
                             text=True, check=True).stdout
    assert "onnx_perforate_cuda_kernels" in targets
    assert "onnx_perforate_ops" not in targets.replace("onnx_perforate_ops_cuda", "")
    assert "onnx_perforate_ops_cuda" not in targets


def _needed_libraries(path: Path) -> list[str]:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not available to read the libraries' dependencies")
    out = subprocess.run([objdump, "-p", str(path)], capture_output=True, text=True, check=True).stdout
    return [line.split()[1] for line in out.splitlines() if line.strip().startswith("NEEDED")]


def test_libraries_need_no_cuda_runtime(kernels_path):
    """Static cudart: only the driver is needed at run time; the CPU library has no CUDA dependency at all."""
    for path in [kernels_path, kernels_path.parent / OPS_CUDA_NAME, kernels_path.parent / OPS_CPU_NAME,
                 kernels_path.parent.parent / OPS_CPU_NAME]:
        if path.is_file():
            needed = _needed_libraries(path)
            assert not [n for n in needed if "cuda" in n or "cublas" in n], f"{path.name} needs {needed}"


def test_kernels_library_exports_entry_points(kernels):
    for name in ("onnx_perforate_cuda_perforated_conv", "onnx_perforate_cuda_nn_interpolate",
                 "onnx_perforate_build_gather_table", "onnx_perforate_cuda_error_string"):
        assert hasattr(kernels, name)
    assert kernels.onnx_perforate_cuda_error_string(CUDA_ERROR_INVALID_VALUE)


def test_invalid_arguments_are_rejected_before_any_launch(kernels):
    conv = kernels.onnx_perforate_cuda_perforated_conv
    args = dict(N=1, C=6, H=5, W=5, M=4, group=1, kh=3, kw=3, K=9, activation=0)

    def call(**changes):
        a = {**args, **changes}
        return conv(None, None, None, None, a["N"], a["C"], a["H"], a["W"], a["M"], a["group"], a["kh"], a["kw"],
                    a["K"], a["activation"], 0.0, 0.0, 0.0, None, None)

    assert call(group=4) == CUDA_ERROR_INVALID_VALUE  # does not divide C
    assert call(activation=7) == CUDA_ERROR_INVALID_VALUE
    assert call(kh=0) == CUDA_ERROR_INVALID_VALUE
    assert call() == CUDA_ERROR_INVALID_VALUE  # NULL pointers
    assert call(N=0) == 0  # empty: nothing to launch
    assert call(K=0) == 0
    interp = kernels.onnx_perforate_cuda_nn_interpolate
    assert interp(None, None, 0, 4, 9, None, None) == 0
    assert interp(None, None, -1, 4, 9, None, None) == CUDA_ERROR_INVALID_VALUE


def test_empty_tensors_pass_the_argument_checks(kernels):
    """NULL X and W of zero-element tensors (as ONNX Runtime passes them) are accepted where nothing is read:
    the call gets past the argument checks to the launch, which fails here only for lack of a GPU."""
    conv = kernels.onnx_perforate_cuda_perforated_conv
    table, out, weights = 1024, 2048, 4096  # fake device addresses: never dereferenced before the launch

    def call(x, w, c, h):
        return conv(x, w, None, table, 2, c, h, 3, 4, 1, 3, 3, 5, 1, 0.0, 0.0, 0.0, out, None)

    assert call(None, None, 0, 4) != CUDA_ERROR_INVALID_VALUE  # C = 0: X and W both empty
    assert call(None, weights, 4, 0) != CUDA_ERROR_INVALID_VALUE  # H = 0: X empty, all taps in padding
    assert call(None, weights, 4, 4) == CUDA_ERROR_INVALID_VALUE  # X has data: NULL is an error
    assert call(None, None, 4, 0) == CUDA_ERROR_INVALID_VALUE  # W has data
    assert conv(None, None, None, None, 2, 0, 4, 3, 4, 1, 3, 3, 5, 1, 0.0, 0.0, 0.0, out, None) == CUDA_ERROR_INVALID_VALUE


@pytest.mark.parametrize("kind", list(KERNEL_CASES))
def test_cases_select_the_kernel_they_are_meant_for(kernels, kind):
    for case in KERNEL_CASES[kind]:
        kernel, splits = _kernel_choice(kernels, case, *H200)
        assert kernel == ("small tiles" if kind == "split" else kind), _case_id(case)
        assert splits > 1 if kind == "split" else kind == "small tiles" or splits == 1, _case_id(case)
    if kind == "big tiles":  # a partial M tile with K odd, as the review asked
        assert any(case[2] // case[10] % 64 and int(_mask_for(case, np.random.default_rng(0)).sum()) % 2
                   for case in KERNEL_CASES[kind])


def test_launch_choice_rules(kernels):
    sms, per_sm = H200
    # Big tiles need one full wave of resident blocks: 2 per SM, not 1.
    one_wave = 132 * 128  # columns (N * K) giving 132 big-tile blocks for 64 outputs
    assert conv_launch(kernels, 1, 64, 64, 1, 3, 3, one_wave, sms, per_sm)[0] == "small tiles"
    assert conv_launch(kernels, 1, 64, 64, 1, 3, 3, one_wave, sms, 1)[0] == "big tiles"
    assert conv_launch(kernels, 2, 64, 64, 1, 3, 3, one_wave, sms, per_sm)[0] == "big tiles"
    # The direct kernel: depthwise, or few outputs and few inputs per group; many inputs go to a GEMM.
    assert conv_launch(kernels, 1, 512, 512, 512, 3, 3, 100, sms, per_sm)[0] == "direct"
    assert conv_launch(kernels, 1, 64, 32, 4, 3, 3, 100, sms, per_sm)[0] == "direct"
    assert conv_launch(kernels, 1, 256, 8, 1, 3, 3, 100, sms, per_sm)[0] == "small tiles"
    # Empty problems, and C = 0 (activation(bias) only).
    assert conv_launch(kernels, 0, 8, 8, 1, 3, 3, 100, sms, per_sm)[0] == "nothing"
    assert conv_launch(kernels, 1, 0, 8, 1, 3, 3, 100, sms, per_sm)[0] == "bias only"
    # Deterministic mode never splits the reduction.
    assert conv_launch(kernels, 1, 256, 64, 1, 3, 3, 49, sms, per_sm)[1] > 1
    assert conv_launch(kernels, 1, 256, 64, 1, 3, 3, 49, sms, per_sm, deterministic=True)[1] == 1
    with pytest.raises(ValueError, match="invalid convolution"):
        conv_launch(kernels, 1, 6, 8, 4, 3, 3, 100, sms, per_sm)


def _numpy_gather_table(h, w, kh, kw, stride, pads, dilation, mask):
    ys, xs = np.nonzero(mask)
    rows = []
    for i in range(kh):
        for j in range(kw):
            iy = ys * stride[0] - pads[0] + i * dilation[0]
            ix = xs * stride[1] - pads[1] + j * dilation[1]
            inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
            rows.append(np.where(inside, iy * w + ix, -1))
    return np.array(rows, dtype=np.int32)


@pytest.mark.parametrize("geometry", [
    (7, 9, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (12, 10, 5, 3, (2, 1), (2, 0, 1, 1), (1, 2)),
    (6, 6, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1)),
    (15, 13, 3, 3, (2, 3), (0, 1, 2, 1), (2, 1)),
])
def test_gather_table_helper(kernels, geometry):
    h, w, kh, kw, stride, pads, dilation = geometry
    ho, wo = conv_output_size((h, w), (kh, kw), stride, pads, dilation)
    rng = np.random.default_rng(0)
    for kind in ("ones", "single", "r=0.5", "grid"):
        mask = make_mask(kind, (ho, wo), rng)
        table = gather_table(kernels, h, w, kh, kw, stride, pads, dilation, mask)
        np.testing.assert_array_equal(table, _numpy_gather_table(h, w, kh, kw, stride, pads, dilation, mask))


def test_gather_table_helper_errors(kernels):
    with pytest.raises(ValueError, match="mask has shape"):
        gather_table(kernels, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), np.ones((7, 8), np.uint8))
    with pytest.raises(ValueError, match="no nonzero"):
        gather_table(kernels, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), np.zeros((8, 8), np.uint8))


def test_nearest_index_ties_to_smallest():
    mask = np.zeros((3, 3), np.uint8)
    mask[0, 0] = mask[0, 2] = 1
    index = nearest_index(mask)
    assert index[0, 1] == 0 and index[2, 1] == 0  # equidistant: the first computed position
    assert index[2, 2] == 1


@pytest.mark.gpu
def test_ort_cuda_provider_runs_compact_models():
    """A rewritten model with the compact pass (PerforatedConv reading a compact input through
    X_index, compact 1x1 convs) runs on the CUDA EP and matches the CPU kernels."""
    ort, onnx_perforate = _ort_cuda()
    pytest.importorskip("onnx_graphsurgeon", reason="the rewriter (onnx_perforate.rewrite) needs onnx-graphsurgeon")
    from helpers import chained_perforated_convs

    rewritten = onnx_perforate.rewrite(*chained_perforated_convs(with_1x1=True)).SerializeToString()
    x = np.random.default_rng(0).uniform(0.1, 1.0, (2, 4, 10, 10)).astype(np.float32)
    cpu = ort.InferenceSession(rewritten, onnx_perforate.session_options(), providers=["CPUExecutionProvider"])
    gpu_options = onnx_perforate.session_options(cuda=True)
    gpu_options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    gpu = ort.InferenceSession(rewritten, gpu_options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    want, got = cpu.run(None, {"x": x})[0], gpu.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))


@pytest.mark.gpu
@pytest.mark.parametrize("mode, attrs", [
    ("max", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("average", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
])
def test_ort_cuda_provider_runs_compact_pool(mode, attrs):
    """CompactPool on the CUDA EP agrees with the CPU kernel, with and without Y_positions."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_perforate import ops

    ort, onnx_perforate = _ort_cuda()
    rng = np.random.default_rng(5)
    mask = rng.random((15, 13)) < 0.4
    mask[0, 0] = True
    index = nearest_index(mask)
    k = int(mask.sum())
    for positions in (None, np.array([0, 3, 11, 20], np.int64)):
        inputs = ["x", "x_index"] + (["y_positions"] if positions is not None else [])
        inits = [numpy_helper.from_array(index, "x_index")]
        if positions is not None:
            inits.append(numpy_helper.from_array(positions, "y_positions"))
        graph = helper.make_graph([ops.make_compact_pool_node(inputs, "y", "pool", mode=mode, **attrs)], "pool",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), ops.opset_import()]).SerializeToString()
        cpu = ort.InferenceSession(model, onnx_perforate.session_options(), providers=["CPUExecutionProvider"])
        gpu_options = onnx_perforate.session_options(cuda=True)
        gpu_options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        gpu = ort.InferenceSession(model, gpu_options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        for batch in (1, 3):
            x = rng.standard_normal((batch, 6, k)).astype(np.float32)
            np.testing.assert_allclose(gpu.run(None, {"x": x})[0], cpu.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)


# --- PerforatedQLinearConv has no CUDA kernel ----------------------------------------------------------


def _quantized_model(name="qconv") -> tuple[bytes, np.ndarray]:
    """One PerforatedQLinearConv (uint8 x int8, per-channel weights) and a uint8 input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnx_perforate import ops

    rng = np.random.default_rng(11)
    c, m, hw = 16, 24, 10
    mask = rng.random((hw, hw)) < 0.6
    params = {"x_scale": np.float32(0.02), "x_zero_point": np.uint8(120),
              "w": rng.integers(-127, 128, (m, c, 3, 3), dtype=np.int8),
              "w_scale": rng.uniform(0.001, 0.01, m).astype(np.float32), "w_zero_point": np.zeros(m, np.int8),
              "y_scale": np.float32(0.5), "y_zero_point": np.uint8(128), "mask": mask}
    node = ops.make_perforated_qlinear_conv_node(
        ["x", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point", "y_scale", "y_zero_point", "", "mask"], "yc",
        ops.ConvAttributes(kernel_shape=(3, 3), pads=(1, 1, 1, 1)), name)
    graph = helper.make_graph([node], "quantized", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, c, hw, hw])],
                              [helper.make_tensor_value_info("yc", TensorProto.UINT8, [1, m, int(mask.sum())])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), ops.opset_import()])
    onnx.checker.check_model(model)
    return model.SerializeToString(), rng.integers(0, 256, (1, c, hw, hw), dtype=np.uint8)


def test_cuda_library_still_runs_the_quantized_op_on_the_cpu():
    """The CUDA ops library registers PerforatedQLinearConv for CUDAExecutionProvider only as a refusal:
    in a CPU session it must still run the CPU kernel, with the same result as the CPU library."""
    import onnxruntime as ort

    import onnx_perforate

    try:
        cuda_options = onnx_perforate.session_options(1, cuda=True)
    except LibraryNotFoundError as e:
        pytest.skip(f"the CUDA ops library is not built: {e}")
    model, x = _quantized_model()
    cpu = ort.InferenceSession(model, onnx_perforate.session_options(1), providers=["CPUExecutionProvider"])
    with_cuda_library = ort.InferenceSession(model, cuda_options, providers=["CPUExecutionProvider"])
    expected = cpu.run(None, {"x": x})[0]
    assert len(np.unique(expected)) > 10
    np.testing.assert_array_equal(with_cuda_library.run(None, {"x": x})[0], expected)


@pytest.mark.gpu
def test_ort_cuda_provider_refuses_the_quantized_op_naming_the_node():
    ort, onnx_perforate = _ort_cuda()
    model, _ = _quantized_model(name="conv_int8")
    with pytest.raises(Exception, match="PerforatedQLinearConv node 'conv_int8'.*no CUDA kernel"):
        ort.InferenceSession(model, onnx_perforate.session_options(cuda=True),
                             providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
