// CPU math of PerforatedQLinearConv (docs/ops.md): uint8 activations x int8 weights -> int32, an
// implicit GEMM over the computed positions, requantized to uint8 as the output is written.
//
// The input is copied once into a padded NHWC buffer (spatial padding filled with the input zero
// point, so padding contributes exactly 0 after the zero-point correction; a compact input is
// interpolated first, with the uint8 NNInterpolate; the NCHW -> NHWC reorder is 16x16 byte transposes
// in registers). A micro-kernel then broadcasts 4 (VNNI) or 2 (AVX2) consecutive channels of
// one pixel and multiplies them with a vector of output channels:
//   - AVX-512 VNNI: vpdpbusd, u8 x s8 summed over 4 channels into int32 lanes (no saturation);
//   - AVX2: the input widened to int16 and vpmaddwd (int16 x int16 pairs into int32). vpmaddubsw is not
//     used: its u8 x s8 pair sum saturates at int16 (255 * 127 * 2 > 32767), the reason ORT offers
//     reduce_range;
//   - portable C++ otherwise (and with ONNX_PERFORATE_GEMM=portable).
// acc[m, k] = sum w * x - x_zero_point * sum_p w[m, p] + bias[m], exact in int32; then MLAS's
// requantization: float(acc) * (x_scale * w_scale[m] / y_scale), clamped, rounded to nearest even,
// plus y_zero_point. Asymmetric weights (a nonzero w_zero_point) add - w_zero_point[m] * S[k], with
// S[k] = sum_p (x - x_zero_point) over position k's receptive field (in its group), computed from the
// same padded copy of X.
//
// Pointwise convolutions (1x1, stride 1, no padding, one group, symmetric weights) with VNNI skip the
// NHWC copy: positions along the vector, weights broadcast, the input's channels interleaved in fours,
// each output channel's positions requantized in registers and stored straight into Yc.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "nn_interpolate.h"
#include "perforated_conv.h"

namespace onnx_perforate {

enum class QuantizedGemmIsa { kPortable, kAvx2, kAvx512Vnni };

// The best quantized micro-kernel of this CPU; ONNX_PERFORATE_GEMM=avx2 / =portable force a slower one.
QuantizedGemmIsa BestQuantizedGemmIsa();
const char* QuantizedGemmIsaName(QuantizedGemmIsa isa);

// Requantization of every output channel and the fused activation, as integer bounds.
struct Requantization {
  int32_t x_zero_point = 0, y_zero_point = 0;
  std::vector<float> scales;  // [M]: x_scale * w_scale[m] / y_scale, computed in float as ORT does
  std::vector<int32_t> bias;  // [M], zeros when B is absent
  std::vector<int32_t> w_zero_points;  // [M] when some weight zero point is nonzero; empty: symmetric weights
  int32_t out_min = 0, out_max = 255;  // the uint8 range, narrowed by Relu / Clip
};

// Weights [M, C/group, kH, kW] int8, packed for one ISA: per group, panels of `mr` output channels,
// tap-major, channels padded to a multiple of `lanes` (4 for VNNI and portable, 2 for AVX2).
struct PackedQuantizedWeights {
  QuantizedGemmIsa isa = QuantizedGemmIsa::kPortable;
  int64_t group = 0, rows = 0, channels = 0, padded_channels = 0, taps = 0;
  int64_t mr = 0, vectors = 0, panels = 0, lanes = 4;
  std::vector<int8_t> bytes;   // VNNI and portable: [g][panel][tap][c / 4][mr][4]
  std::vector<int16_t> words;  // AVX2: [g][panel][tap][c / 2][mr][2]
  std::vector<int32_t> row_sums;  // [M]: sum of each output channel's weights
  int64_t PanelSize() const { return taps * padded_channels * mr; }
};

struct PerforatedQLinearConvCpu {
  static std::shared_ptr<const PackedQuantizedWeights> PackWeights(const ConvShape& shape, const int8_t* w,
                                                                   QuantizedGemmIsa isa);

  // x [N, C, H, W] uint8 (or compact [N, C, K_in] read through input_index, interpolated with
  // input_bytes = NNInterpolateCpu::PlanBytes of it, or nullptr to plan per call) -> yc [N, M, K] uint8.
  // `padded` comes from BuildPaddedGather(shape, attrs, mask) without an index: positions and taps as
  // pixel offsets in the padded plane.
  static void Compute(const ConvShape& shape, const ConvAttributes& attrs, const PaddedGather& padded,
                      int64_t count, const InputIndex* input_index, const BytePermutePlan* input_bytes,
                      const uint8_t* x,
                      const PackedQuantizedWeights& weights, const Requantization& requant, uint8_t* yc,
                      const ParallelRunner& parallel);
};

}  // namespace onnx_perforate
