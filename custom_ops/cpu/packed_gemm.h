// The GEMM behind the CPU PerforatedConv: Yc[m, k] = sum_p W[m, p] * X_col[p, k], where X_col is the
// im2col matrix restricted to the computed positions. Weights are packed once per kernel (they are
// constant initializers). X_col is never built: the micro-kernel broadcasts its elements straight from
// the (padded) input, row p of X_col being rows[p][positions[k]] (implicit GEMM). That removes the
// im2col pass, which cost 12-15% of the time even when written directly in packed order.
//
// Micro-kernel: a tile of MR output channels (one or two SIMD vectors) x NR positions, accumulated
// in registers over a KC-long slice of p. AVX-512: 32 x 12 (24 zmm accumulators); AVX2: 16 x 6. The
// tile is position-major; the ISA's store transposes it in registers into Yc's channel-major rows
// (a scalar transposition cost up to 40% of the time on layers with short reductions, e.g. conv1).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "../shared/conv_geometry.h"

namespace onnx_perforate {

// What the GEMM's output gets on its way out: a per-row bias, then the fused activation.
struct Epilogue {
  const float* bias = nullptr;  // per output row, or null
  Activation activation = Activation::kNone;
  float alpha = 0.0f, clip_min = 0.0f, clip_max = 0.0f;
};

struct GemmIsa {
  const char* name = "none";
  int width = 0;  // floats per SIMD vector
  int nr = 0;     // positions per micro-tile
  // kernel(kc, a, rows, positions, c, ldc, first):
  //   c[j * ldc + r] (+)= sum_{p < kc} a[p * MR + r] * rows[p][positions[j]]   for r < MR, j < NR
  using Kernel = void (*)(int64_t, const float*, const float* const*, const int32_t*, float*, int64_t, bool);
  // kernels[vectors - 1][half][prefetch]: MR = vectors * width; half: NR / 2 positions (a last tile of
  // at most NR / 2 positions wastes no work); prefetch: the weight panel is prefetched ahead of its
  // loads, for passes whose weights are not in L2.
  using KernelTable = std::array<std::array<std::array<Kernel, 2>, 2>, 2>;
  KernelTable kernels{};
  // store(tile, ldt, rows, columns, epilogue, out, ldo):
  //   out[m * ldo + k] = act(tile[k * ldt + m] + bias[m])   for m < rows, k < columns
  // The micro-kernel's position-major tile transposed into channel-major rows, 16 x 16 (AVX-512) or
  // 8 x 8 (AVX2) blocks at a time in registers. ldt must be a multiple of the vector width.
  using Store = void (*)(const float*, int64_t, int64_t, int64_t, const Epilogue&, float*, int64_t);
  Store store = nullptr;
  Kernel Get(int vectors, bool half, bool prefetch) const { return kernels[vectors - 1][half][prefetch]; }
};

// The best micro-kernel this CPU runs, or a GemmIsa with width 0 (then the caller uses OpenBLAS).
// ONNX_PERFORATE_GEMM=openblas forces the BLAS path, =avx2 the AVX2 kernels (for comparisons and tests).
const GemmIsa& BestGemmIsa();

// The other orientation, positions along the vector and weights broadcast, for AVX-512 CPUs
// (BestGemmIsa().width == 16) only: out[m * ldo + k] = act(bias[m] + sum_p w[m * patch + p] * xrows[p][k])
// for m < rows, k < columns, with w row-major [rows, patch] (ONNX's layout: no packing). Its output rows
// come out of the registers as they are, with no transposition: for short reductions (1x1 convolutions
// on few channels, three-channel first layers) the micro-kernel above spends more on its transposed store
// than on its few accumulations. xrows[p][k] must be readable for k < columns.
void ChannelMajorGemm(const float* w, int64_t patch, int64_t rows, const float* const* xrows, int64_t columns,
                      const Epilogue& e, float* out, int64_t ldo);

// W of one convolution, per group, in MR-row panels: data[((g * panels + i) * patch + p) * mr + r].
struct PackedWeights {
  int64_t group = 0, rows = 0, patch = 0;  // rows = output channels per group
  int mr = 0, vectors = 0;                 // vectors = MR / width
  int64_t panels = 0;                      // ceil(rows / mr)
  std::vector<float> data;
  const float* Panel(int64_t g, int64_t i) const { return data.data() + ((g * panels + i) * patch) * mr; }
};

// w is [group * rows, patch] row-major (ONNX Conv weights flattened).
std::shared_ptr<const PackedWeights> PackWeights(const float* w, int64_t group, int64_t rows, int64_t patch,
                                                 const GemmIsa& isa);

}  // namespace onnx_perforate
