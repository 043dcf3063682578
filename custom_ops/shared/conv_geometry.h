// Shape arithmetic and index tables shared by the CPU and CUDA kernels of PerforatedConv and
// NNInterpolate. Nothing here knows about ONNX Runtime: the glue in ort_glue.cc reads attributes
// and tensors and hands plain structs to the kernels.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace onnx_perforate {

// Thrown for invalid inputs or attributes; the glue turns it into an ORT error status that names the
// op and the node.
struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string ShapeToString(const std::vector<int64_t>& shape);

// a * b and a + b, or an OpError naming `what` when the result does not fit in int64.
int64_t CheckedMul(int64_t a, int64_t b, const std::string& what);
int64_t CheckedAdd(int64_t a, int64_t b, const std::string& what);

enum class Activation { kNone, kRelu, kLeakyRelu, kClip };

Activation ParseActivation(const std::string& name);

// Conv attributes, already validated and expanded to explicit 2-D values.
struct ConvAttributes {
  int64_t kernel_h = 0, kernel_w = 0;  // 0 = take from W's shape
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  int64_t group = 1;
  Activation activation = Activation::kNone;
  float alpha = 0.01f;  // LeakyRelu slope
  float clip_min = -3.402823466e38f, clip_max = 3.402823466e38f;
};

// The sizes of one PerforatedConv call, derived from X, W and the attributes.
struct ConvShape {
  int64_t batch = 0, in_channels = 0, in_h = 0, in_w = 0;
  int64_t out_channels = 0, kernel_h = 0, kernel_w = 0;
  int64_t out_h = 0, out_w = 0;
  int64_t group = 1;
  // Floats between two channel planes of X: in_h * in_w, or K_in when X is compact (see InputIndex).
  int64_t in_plane = 0;
  int64_t in_channels_per_group() const { return in_channels / group; }
  int64_t out_channels_per_group() const { return out_channels / group; }
  int64_t taps() const { return kernel_h * kernel_w; }
  // Rows of the im2col matrix of one group.
  int64_t patch_size() const { return in_channels_per_group() * taps(); }
};

// PerforatedConv's optional input X_index: X is then compact, [N, C, K_in], and the input pixel at grid
// position (y, x) is X[n, c, index[y * in_w + x]] (the producer's NNInterpolate index). The kernel reads
// through it instead of materialising the interpolated input (implicit interpolation).
struct InputIndex {
  std::vector<int32_t> values;  // [in_h * in_w], validated to lie in [0, compact_size)
  int64_t in_h = 0, in_w = 0, compact_size = 0;
};

// Validates X_index [H, W] int64 against compact X [N, C, K_in]; throws OpError naming what is wrong.
InputIndex ReadInputIndex(const int64_t* index, const std::vector<int64_t>& index_shape,
                          const std::vector<int64_t>& x_shape);

// Validates X [N, C, H, W] and W [M, C/group, kH, kW] against the attributes; throws OpError naming the
// offending tensor and what was expected. With `index`, X is compact [N, C, K_in] (validated by
// ReadInputIndex) and stands for [N, C, H, W]; in_plane is then K_in.
ConvShape ComputeConvShape(const std::vector<int64_t>& x_shape, const std::vector<int64_t>& w_shape,
                           const std::vector<int64_t>* b_shape, const ConvAttributes& attrs,
                           const InputIndex* index = nullptr);

// The computed positions of a mask, in row-major order: position k of the compact output is
// (positions[k] / out_w, positions[k] % out_w).
struct MaskPositions {
  int64_t out_h = 0, out_w = 0;
  std::vector<int32_t> positions;
  int64_t count() const { return static_cast<int64_t>(positions.size()); }
};

// mask_shape must equal {out_h, out_w}; nonzero entries are computed. Throws for a wrong shape or an
// empty mask (K = 0).
MaskPositions ComputeMaskPositions(const uint8_t* mask, const std::vector<int64_t>& mask_shape,
                                   int64_t out_h, int64_t out_w);

// Division-free gather table for the im2col matrix restricted to the computed positions:
// offsets[tap * K + k] is the offset iy * in_w + ix inside one input plane of the input pixel read by
// kernel tap `tap` (= i * kernel_w + j) for computed position k, or -1 where that pixel is padding.
struct GatherTable {
  int64_t taps = 0, count = 0;
  std::vector<int32_t> offsets;
};

// With an input index, offsets point into the compact plane (K_in floats) instead.
GatherTable BuildGatherTable(const ConvShape& shape, const ConvAttributes& attrs,
                             const MaskPositions& mask, const InputIndex* index = nullptr);

}  // namespace onnx_perforate
