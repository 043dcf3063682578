#include "perforated_conv.h"

#include <algorithm>
#include <vector>

#include "blas.h"

namespace onnx_perforate {

namespace {

// Compiled for several ISAs and picked at load time: the library must run on any x86-64 CPU.
#define PERFORATE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

// One im2col row: dst[k] = plane[offsets[k]], 0 where the offset marks padding (-1). The clamped load
// keeps the loop branch-free and vectorisable (masked gathers).
PERFORATE_MULTIVERSION
void GatherRow(const float* __restrict plane, const int32_t* __restrict offsets, int64_t n,
               float* __restrict dst) {
  for (int64_t k = 0; k < n; ++k) {
    const int32_t o = offsets[k];
    const float v = plane[o < 0 ? 0 : o];
    dst[k] = o < 0 ? 0.0f : v;
  }
}

// Same, accumulating w * pixel: the depthwise path, where a GEMM of one row would waste the BLAS call.
PERFORATE_MULTIVERSION
void GatherRowAxpy(const float* __restrict plane, const int32_t* __restrict offsets, int64_t n, float w,
                   float* __restrict acc) {
  for (int64_t k = 0; k < n; ++k) {
    const int32_t o = offsets[k];
    const float v = plane[o < 0 ? 0 : o];
    acc[k] += o < 0 ? 0.0f : w * v;
  }
}

PERFORATE_MULTIVERSION
void BiasActivation(float* __restrict y, int64_t n, float bias, Activation act, float alpha, float lo,
                    float hi) {
  switch (act) {
    case Activation::kNone:
      for (int64_t k = 0; k < n; ++k) y[k] += bias;
      break;
    case Activation::kRelu:
      for (int64_t k = 0; k < n; ++k) y[k] = std::max(y[k] + bias, 0.0f);
      break;
    case Activation::kLeakyRelu:
      for (int64_t k = 0; k < n; ++k) {
        const float v = y[k] + bias;
        y[k] = v < 0.0f ? alpha * v : v;
      }
      break;
    case Activation::kClip:
      for (int64_t k = 0; k < n; ++k) y[k] = std::min(std::max(y[k] + bias, lo), hi);
      break;
  }
}

// Columns (computed positions) per task, a multiple of `unit`. Enough blocks keep every core of the
// pool busy when N * group is small; the bounds keep a task's buffers in L2 and amortise its setup.
int64_t ColumnBlock(int64_t count, int64_t outer_tasks, int64_t unit, int64_t min_block, int64_t max_block) {
  constexpr int64_t kMinTasks = 8;
  const int64_t wanted = std::max<int64_t>(1, (kMinTasks + outer_tasks - 1) / outer_tasks);
  int64_t block = (count + wanted - 1) / wanted;
  block = std::min(std::max(block, min_block), max_block);
  block = (block + unit - 1) / unit * unit;
  return std::min(block, (count + unit - 1) / unit * unit);
}

// Per-thread scratch, reused across calls: tasks of ORT's pool never share it.
thread_local std::vector<float> tls_panel;
thread_local std::vector<float> tls_tile;

float* Scratch(std::vector<float>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

// Reduction depth of one pass: KC x NR of the gathered input (12 KiB at KC = 256) stays in L1 and
// MR x KC panels of the weights in L2 while the micro-kernel sweeps them.
constexpr int64_t kKc = 256;

}  // namespace

std::shared_ptr<const PackedWeights> PerforatedConvCpu::PackWeightsFor(const ConvShape& s, const float* w) {
  const GemmIsa& isa = BestGemmIsa();
  if (!isa.width || s.in_channels_per_group() == 1) return nullptr;
  return PackWeights(w, s.group, s.out_channels_per_group(), s.patch_size(), isa);
}

void PerforatedConvCpu::Compute(const ConvShape& s, const ConvAttributes& a, const GatherTable& table,
                                const float* x, const float* w, const PackedWeights* packed,
                                const float* bias, float* yc, const ParallelRunner& parallel) {
  const int64_t count = table.count, taps = s.taps();
  const int64_t cg = s.in_channels_per_group(), mg = s.out_channels_per_group();
  const int64_t patch = s.patch_size(), plane = s.in_h * s.in_w;
  if (s.batch == 0 || s.out_channels == 0) return;

  auto finish = [&](float* out, int64_t m, int64_t n) {
    BiasActivation(out, n, bias ? bias[m] : 0.0f, a.activation, a.alpha, a.clip_min, a.clip_max);
  };

  if (cg == 1) {
    // Depthwise (and channel-multiplier) convolutions: direct accumulation, one output channel per task.
    const int64_t block = ColumnBlock(count, s.batch * s.out_channels, 16, 128, 1024);
    const int64_t blocks = (count + block - 1) / block;
    parallel(static_cast<size_t>(s.batch * s.out_channels * blocks), [&](size_t t) {
      const int64_t b = t % blocks, nm = t / blocks, m = nm % s.out_channels, n = nm / s.out_channels;
      const int64_t k0 = b * block, kn = std::min(block, count - k0);
      const float* src = x + (n * s.in_channels + m / mg) * plane;
      float* out = yc + (n * s.out_channels + m) * count + k0;
      std::fill(out, out + kn, 0.0f);
      for (int64_t tap = 0; tap < taps; ++tap)
        GatherRowAxpy(src, table.offsets.data() + tap * count + k0, kn, w[m * taps + tap], out);
      finish(out, m, kn);
    });
    return;
  }

  if (packed) {
    const GemmIsa& isa = BestGemmIsa();
    const int64_t nr = isa.nr, mr = packed->mr, mpad = packed->panels * mr;
    const GemmIsa::Kernel kernel = packed->vectors == 2 ? isa.kernel_2v : isa.kernel_1v;
    const int64_t block = ColumnBlock(count, s.batch * s.group, nr, 2 * nr, 16 * nr);
    const int64_t blocks = (count + block - 1) / block;
    parallel(static_cast<size_t>(s.batch * s.group * blocks), [&](size_t t) {
      const int64_t b = t % blocks, ng = t / blocks, g = ng % s.group, n = ng / s.group;
      const int64_t k0 = b * block, kn = std::min(block, count - k0), tiles = (kn + nr - 1) / nr;
      // tile[k * mpad + m]: the block's outputs, position-major, accumulated across KC passes.
      float* tile = Scratch(tls_tile, static_cast<size_t>(tiles * nr * mpad));
      float* panel = Scratch(tls_panel, static_cast<size_t>(tiles * kKc * nr));
      for (int64_t pc = 0; pc < patch; pc += kKc) {
        const int64_t kc = std::min(kKc, patch - pc);
        // Gather rows [pc, pc + kc) of the im2col matrix straight into micro-kernel order
        // panel[(tile * kc + p) * nr + q]; positions past the block's end read as 0.
        for (int64_t p = 0; p < kc; ++p) {
          const int64_t row = pc + p, c = row / taps, tap = row % taps;
          const float* src = x + (n * s.in_channels + g * cg + c) * plane;
          const int32_t* offsets = table.offsets.data() + tap * count + k0;
          for (int64_t j = 0; j < tiles; ++j) {
            float* dst = panel + (j * kc + p) * nr;
            const int64_t valid = std::min(nr, kn - j * nr);
            GatherRow(src, offsets + j * nr, valid, dst);
            for (int64_t q = valid; q < nr; ++q) dst[q] = 0.0f;
          }
        }
        for (int64_t j = 0; j < tiles; ++j)
          for (int64_t i = 0; i < packed->panels; ++i)
            kernel(kc, packed->Panel(g, i) + pc * mr, panel + j * kc * nr, tile + j * nr * mpad + i * mr, mpad,
                   pc == 0);
      }
      for (int64_t m = 0; m < mg; ++m) {
        float* out = yc + (n * s.out_channels + g * mg + m) * count + k0;
        for (int64_t k = 0; k < kn; ++k) out[k] = tile[k * mpad + m];
        finish(out, g * mg + m, kn);
      }
    });
    return;
  }

  const Blas& blas = GetBlas();
  const int64_t block = ColumnBlock(count, s.batch * s.group, 16, 128, 768);
  const int64_t blocks = (count + block - 1) / block;
  parallel(static_cast<size_t>(s.batch * s.group * blocks), [&](size_t t) {
    const int64_t b = t % blocks, ng = t / blocks, g = ng % s.group, n = ng / s.group;
    const int64_t k0 = b * block, kn = std::min(block, count - k0);
    float* panel = Scratch(tls_panel, static_cast<size_t>(patch * kn));
    // im2col panel [cg * taps, kn], restricted to this block of computed positions.
    for (int64_t c = 0; c < cg; ++c) {
      const float* src = x + (n * s.in_channels + g * cg + c) * plane;
      for (int64_t tap = 0; tap < taps; ++tap)
        GatherRow(src, table.offsets.data() + tap * count + k0, kn, panel + (c * taps + tap) * kn);
    }
    float* out = yc + (n * s.out_channels + g * mg) * count + k0;
    blas.Sgemm(static_cast<int>(mg), static_cast<int>(kn), static_cast<int>(patch), w + g * mg * patch,
               static_cast<int>(patch), panel, static_cast<int>(kn), out, static_cast<int>(count));
    for (int64_t m = 0; m < mg; ++m) finish(out + m * count, g * mg + m, kn);
  });
}

}  // namespace onnx_perforate
