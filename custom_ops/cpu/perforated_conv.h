// CPU math of PerforatedConv: an implicit GEMM over the computed positions (packed_gemm.h); depthwise
// convolutions accumulate directly, CPUs without AVX2 build im2col rows for OpenBLAS.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "../shared/conv_geometry.h"
#include "nn_interpolate.h"
#include "packed_gemm.h"
#include "parallel.h"

namespace onnx_perforate {

// What the implicit-GEMM path reads: the input with the convolution's padding materialised (so no
// position needs a bounds check), each computed position's top-left input pixel in that padded plane,
// and each kernel tap's offset from it.
struct PaddedGather {
  int64_t padded_h = 0, padded_w = 0;
  int64_t plane = 0;                 // floats between channel planes of what the kernel reads
  bool copy_needed = false;          // padding or a compact X: the kernel writes X into a padded buffer
  bool contiguous = false;           // positions[k] = positions[0] + k (a whole row, a 1x1 on a compact X)
  std::vector<int32_t> positions;    // [K + 16], 0 past K (read by tail tiles, never stored)
  std::vector<int32_t> tap_offsets;  // [kH * kW]
  // A compact X read through a padded copy: per pixel of the padded plane, the compact position it
  // takes (-1: padding), and the permute plan that copies a plane through it (nullptr without AVX-512).
  std::vector<int32_t> sources;
  std::shared_ptr<const FloatPermutePlan> sources_plan;
};

// A compact input (`index`) is interpolated into the padded buffer, except for an unpadded 1x1
// convolution, which reads the compact plane directly: position k reads index[its pixel].
PaddedGather BuildPaddedGather(const ConvShape& shape, const ConvAttributes& attrs, const MaskPositions& mask,
                               const InputIndex* index = nullptr);

// How the CPU computes one PerforatedConv; fixed by the shape and this CPU (see ChooseCpuConvStrategy).
enum class CpuConvStrategy {
  kDepthwise,   // one input channel per group: direct accumulation through the GatherTable
  kPackedGemm,  // implicit GEMM with this CPU's micro-kernel on packed weights, through the PaddedGather
  kBlasGemm,    // im2col rows through the GatherTable, then OpenBLAS (no AVX2, or ONNX_PERFORATE_GEMM=openblas)
};
CpuConvStrategy ChooseCpuConvStrategy(const ConvShape& shape);

// What Compute reads besides the tensors, derived from the mask and the input size: the computed
// positions and the one table its strategy reads.
struct CpuConvPlan {
  CpuConvStrategy strategy = CpuConvStrategy::kBlasGemm;
  MaskPositions positions;
  std::shared_ptr<const InputIndex> input_index;  // set when X is compact
  GatherTable gather;                             // kDepthwise, kBlasGemm
  PaddedGather padded;                            // kPackedGemm
};
std::shared_ptr<const CpuConvPlan> BuildCpuConvPlan(const ConvShape& shape, const ConvAttributes& attrs,
                                                    MaskPositions positions,
                                                    std::shared_ptr<const InputIndex> input_index);

struct PerforatedConvCpu {
  // x [N, C, H, W] (or compact [N, C, K_in] when plan.input_index is set), w [M, C/group, kH, kW],
  // bias [M] or nullptr -> yc [N, M, K]. `plan` must have been built for `shape`; `packed` holds w packed
  // by PackWeightsFor, required by the kPackedGemm strategy.
  static void Compute(const ConvShape& shape, const ConvAttributes& attrs, const CpuConvPlan& plan, const float* x,
                      const float* w, const PackedWeights* packed, const float* bias, float* yc,
                      const ParallelRunner& parallel);

  // Packed weights for this CPU's micro-kernel, or nullptr where the strategy is not kPackedGemm.
  static std::shared_ptr<const PackedWeights> PackWeightsFor(const ConvShape& shape, const float* w);
};

}  // namespace onnx_perforate
