"""Running models in ONNX Runtime, done one way for the whole package: the model's input, the input
that timing feeds, sessions built from the package's session options, interleaved timing, and peak
memory measured in a fresh subprocess.

Benchmark headers name the CPU with :func:`cpu_description`: the kernels (ours and ORT's) take different
paths with and without AVX-512 and VNNI, so a table means little without it.

Timing feeds U(0, 1) values with seed 0 (:func:`timing_array`): every timed comparison, from the CLI's
``bench`` to the tuner and the benchmark scripts, sees the same kind of input.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import onnx

from .errors import DataError

log = logging.getLogger(__name__)

# The instruction sets that choose the kernels' paths, ours and ORT's (MLAS), in the order named.
_SIMD_LEVELS = (("avx512f", "AVX-512"), ("avx2", "AVX2"))
_DOT_PRODUCTS = ("avx512_vnni", "avx_vnni")


def _cpuinfo_fields(cpuinfo: str | None) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (``cpuinfo`` is its text; read when None; empty
    where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _flags(fields: dict[str, str]) -> frozenset[str]:
    return frozenset(fields.get("flags", "").split())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux names them (``avx512f``, ``avx2``...); empty elsewhere."""
    return _flags(_cpuinfo_fields(None))


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU timings run on, for benchmark headers: its model, its widest SIMD level, whether it has
    VNNI (ORT's INT8 sums are exact only with it; docs/ops.md), and the cores this process may use.
    ``cpuinfo`` is /proc/cpuinfo's text (read when None; other systems get the platform's name)."""
    fields = _cpuinfo_fields(cpuinfo)
    flags = _flags(fields)
    parts = [fields.get("model name") or platform.processor() or platform.machine()]
    if flags:
        simd = next((name for flag, name in _SIMD_LEVELS if flag in flags), "no AVX2")
        parts.append(f"{simd}, {'VNNI' if flags & set(_DOT_PRODUCTS) else 'no VNNI'}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts.append(f"{cores} cores")
    return ", ".join(parts)


class ModelInput(NamedTuple):
    """A model's one data input (graph inputs that are initializers do not count)."""

    name: str
    dims: tuple  # an int per static dimension, None for a dynamic one

    @property
    def fixed_batch(self) -> int | None:
        return self.dims[0] if self.dims else None


def model_input(model: onnx.ModelProto) -> ModelInput:
    """The model's data input; :class:`DataError` unless there is exactly one."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise DataError(f"onnx-perforate feeds models with one input; this one has {[i.name for i in inputs]}")
    tensor = inputs[0].type.tensor_type
    if not inputs[0].type.HasField("tensor_type") or tensor.elem_type != onnx.TensorProto.FLOAT:
        kind = (onnx.TensorProto.DataType.Name(tensor.elem_type) if inputs[0].type.HasField("tensor_type")
                else inputs[0].type.WhichOneof("value") or "untyped")
        raise DataError(f"input {inputs[0].name!r} of the model is {kind}; onnx-perforate feeds float32 (FLOAT) "
                        "tensors")
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return ModelInput(inputs[0].name, dims)


def class_scores(outputs: np.ndarray, source: str = "the model's output") -> np.ndarray:
    """A classifier's output as [N, classes]: one axis of classes beside the batch ([N, K], [N, K, 1, 1],
    [N, 1, K]). Anything else (a segmentation map, features) is refused: an accuracy, a loss or an
    agreement over its flattened values would mean nothing."""
    outputs = np.asarray(outputs)
    if outputs.ndim < 2 or sum(d > 1 for d in outputs.shape[1:]) > 1:
        raise DataError(f"{source} has shape {list(outputs.shape)}; expected class scores [N, classes] (or [N, classes, "
                        "1, 1]): accuracy, agreement and the tuner's loss are defined for classifiers")
    return outputs.reshape(outputs.shape[0], -1)


def timing_array(shape, seed: int = 0) -> np.ndarray:
    """The values timing runs feed: float32 U(0, 1)."""
    return np.random.default_rng(seed).uniform(0, 1, size=tuple(shape)).astype(np.float32)


def timing_input(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> tuple[str, np.ndarray]:
    """(input name, :func:`timing_array`) for ``model`` at ``batch``; a static batch in the model wins."""
    spec = model_input(model)
    if spec.fixed_batch is not None and spec.fixed_batch != batch:
        log.info("input %r has a static batch of %d: batch %d is ignored", spec.name, spec.fixed_batch, batch)
        batch = spec.fixed_batch
    if any(d is None for d in spec.dims[1:]):
        raise DataError(f"input {spec.name!r} has a dynamic non-batch dimension: {list(spec.dims)}")
    return spec.name, timing_array([batch, *spec.dims[1:]], seed)


def session_options(threads: int | None = None, *, custom_ops: bool = True, allow_spinning: bool | None = False,
                    **settings):
    """The package's session options (see :func:`onnx_perforate.session_options`): one inter-op thread,
    ``threads`` intra-op threads (None: ORT's default) and spinning off unless asked, so that sessions
    timed side by side do not steal each other's cores. ``custom_ops=False`` leaves the custom-op
    library out, for graphs of standard ops only (gradient graphs), which then run without it."""
    from ._library import session_options as library_options

    return library_options(threads, custom_ops=custom_ops, allow_spinning=allow_spinning, **settings)


def session(model, threads: int | None = None, *, custom_ops: bool = True, providers: Sequence[str] | None = None,
            quiet: bool = False, disabled_optimizers: Sequence[str] = (), **settings):
    """An ORT session for ``model`` (a ModelProto or a path) with :func:`session_options`;
    ``disabled_optimizers`` names ORT graph transformers to leave out (e.g. ``NchwcTransformer``)."""
    import onnxruntime as ort

    options = session_options(threads, custom_ops=custom_ops, **settings)
    if quiet:
        options.log_severity_level = 3
    data = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=list(providers or ["CPUExecutionProvider"]),
                                disabled_optimizers=list(disabled_optimizers))


class Timings(NamedTuple):
    """Seconds of each timed run, one list per session: wall-clock and this process's CPU time."""

    wall: list
    cpu: list


def time_interleaved(sessions: Sequence, feeds: Mapping | Sequence[Mapping], repeats: int, *, warmup: int = 5,
                     runs_per_turn: int = 1, progress: Callable | None = None) -> Timings:
    """Time each session ``repeats`` times. The sessions take turns, so that drifts in the machine's
    load hit them alike; ``warmup`` untimed runs each come first. ``feeds`` is one feed for every
    session, or a list of one per session (inputs of different sizes). ``progress`` wraps the range of
    rounds (a tqdm, for example).

    ``runs_per_turn=1``: one timed run per turn, so every run starts with the other sessions' data in
    the caches (the weights of a whole network do not fit in L2). ``runs_per_turn=n > 1``: n runs per
    turn, the first untimed, so each session is timed in the steady state of a model run repeatedly."""
    per_session = [feeds] * len(sessions) if isinstance(feeds, Mapping) else list(feeds)
    if len(per_session) != len(sessions):
        raise ValueError(f"{len(per_session)} feeds for {len(sessions)} sessions")
    if runs_per_turn < 1:
        raise ValueError(f"runs_per_turn must be at least 1, got {runs_per_turn}")
    for s, feed in zip(sessions, per_session):
        for _ in range(warmup):
            s.run(None, feed)
    timings = Timings([[] for _ in sessions], [[] for _ in sessions])
    timed_per_turn = max(1, runs_per_turn - 1)
    rounds = range(-(-repeats // timed_per_turn))
    for _ in progress(rounds) if progress else rounds:
        for i, (s, feed) in enumerate(zip(sessions, per_session)):
            if runs_per_turn > 1:
                s.run(None, feed)
            for _ in range(min(timed_per_turn, repeats - len(timings.wall[i]))):
                start, start_cpu = time.perf_counter(), time.process_time()
                s.run(None, feed)
                timings.wall[i].append(time.perf_counter() - start)
                timings.cpu[i].append(time.process_time() - start_cpu)
    return timings


# ----------------------------------------------------------------------------------------------------
# Peak memory


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_run_memory(path: str | os.PathLike, batch: int, threads: int = 1,
                       disabled_optimizers: Sequence[str] = ()) -> dict:
    """Peak RSS growth while running the model, in *this* process (so call it through
    :func:`peak_memory`, in a fresh one). The CPU arena is off and the memory pattern on, so ORT
    allocates what it plans; the first run (weight packing, gather tables: constant memory, not
    activations) is not counted; the kernel's peak-RSS counter is reset (/proc/self/clear_refs) and
    three runs follow. Returns {session_bytes, run_peak_bytes, resettable}."""
    model = onnx.load(str(path), load_external_data=False)
    name, x = timing_input(model, batch)
    s = session(path, threads, quiet=True, disabled_optimizers=disabled_optimizers, enable_cpu_mem_arena=False)
    s.run(None, {name: x})
    before = _status("VmRSS")
    resettable = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        resettable = False
    for _ in range(3):
        s.run(None, {name: x})
    return {"session_bytes": before, "run_peak_bytes": _status("VmHWM") - before, "resettable": resettable}


def peak_memory(path: str | os.PathLike, batch: int, threads: int = 1,
                disabled_optimizers: Sequence[str] = ()) -> dict | None:
    """:func:`measure_run_memory` in a fresh Python process; None (with a warning) when it fails."""
    command = [sys.executable, "-m", "onnx_perforate.runtime", str(Path(path).resolve()), str(batch), str(threads),
               *disabled_optimizers]
    # Run beside this very package, so that the child imports it and not another copy on its path.
    beside = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=dict(os.environ), cwd=beside)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, IndexError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        log.warning("peak memory not measured: %s %s", exc, detail.strip().splitlines()[-1:] or "")
        return None


if __name__ == "__main__":  # peak_memory's subprocess: python -m onnx_perforate.runtime PATH BATCH THREADS [DISABLED...]
    print(json.dumps(measure_run_memory(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])))
