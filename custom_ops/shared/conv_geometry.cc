#include "conv_geometry.h"

#include <limits>
#include <sstream>

namespace onnx_perforate {

std::string ShapeToString(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ']';
  return s.str();
}

int64_t CheckedMul(int64_t a, int64_t b, const std::string& what) {
  int64_t result = 0;
  if (__builtin_mul_overflow(a, b, &result))
    throw OpError(what + " = " + std::to_string(a) + " * " + std::to_string(b) + " overflows 64-bit integers");
  return result;
}

int64_t CheckedAdd(int64_t a, int64_t b, const std::string& what) {
  int64_t result = 0;
  if (__builtin_add_overflow(a, b, &result))
    throw OpError(what + " = " + std::to_string(a) + " + " + std::to_string(b) + " overflows 64-bit integers");
  return result;
}

Activation ParseActivation(const std::string& name) {
  if (name.empty()) return Activation::kNone;
  if (name == "Relu") return Activation::kRelu;
  if (name == "LeakyRelu") return Activation::kLeakyRelu;
  if (name == "Clip") return Activation::kClip;
  throw OpError("attribute 'activation' is '" + name +
                "', expected one of \"\", \"Relu\", \"LeakyRelu\", \"Clip\"");
}

ConvShape ComputeConvShape(const std::vector<int64_t>& compact_or_x_shape, const std::vector<int64_t>& w_shape,
                           const std::vector<int64_t>* b_shape, const ConvAttributes& a, const InputIndex* index) {
  const std::vector<int64_t> x_shape =
      index ? std::vector<int64_t>{compact_or_x_shape[0], compact_or_x_shape[1], index->in_h, index->in_w}
            : compact_or_x_shape;
  if (x_shape.size() != 4)
    throw OpError("input X has shape " + ShapeToString(x_shape) + ", expected 4-D [N, C, H, W]");
  if (w_shape.size() != 4)
    throw OpError("input W has shape " + ShapeToString(w_shape) + ", expected 4-D [M, C/group, kH, kW]");
  ConvShape s;
  s.batch = x_shape[0];
  s.in_channels = x_shape[1];
  s.in_h = x_shape[2];
  s.in_w = x_shape[3];
  s.out_channels = w_shape[0];
  s.kernel_h = w_shape[2];
  s.kernel_w = w_shape[3];
  s.group = a.group;
  s.in_plane = index ? index->compact_size : s.in_h * s.in_w;
  if (a.group < 1) throw OpError("attribute 'group' is " + std::to_string(a.group) + ", expected >= 1");
  if (s.in_channels % a.group != 0 || s.out_channels % a.group != 0)
    throw OpError("group " + std::to_string(a.group) + " does not divide X's channels (" +
                  std::to_string(s.in_channels) + ") and W's output channels (" +
                  std::to_string(s.out_channels) + ")");
  if (w_shape[1] != s.in_channels / a.group)
    throw OpError("input W has shape " + ShapeToString(w_shape) + ", expected dimension 1 = C/group = " +
                  std::to_string(s.in_channels / a.group) + " for X of shape " + ShapeToString(x_shape));
  if ((a.kernel_h && a.kernel_h != s.kernel_h) || (a.kernel_w && a.kernel_w != s.kernel_w))
    throw OpError("attribute 'kernel_shape' [" + std::to_string(a.kernel_h) + ", " +
                  std::to_string(a.kernel_w) + "] does not match W of shape " + ShapeToString(w_shape));
  if (b_shape && (b_shape->size() != 1 || (*b_shape)[0] != s.out_channels))
    throw OpError("input B has shape " + ShapeToString(*b_shape) + ", expected [" +
                  std::to_string(s.out_channels) + "]");
  if (a.stride_h < 1 || a.stride_w < 1 || a.dilation_h < 1 || a.dilation_w < 1)
    throw OpError("strides and dilations must be >= 1");
  if (a.pad_top < 0 || a.pad_left < 0 || a.pad_bottom < 0 || a.pad_right < 0)
    throw OpError("pads must be >= 0");
  for (int64_t d : x_shape)
    if (d < 0) throw OpError("input X has shape " + ShapeToString(x_shape) + " with a negative dimension");
  if (s.kernel_h < 1 || s.kernel_w < 1)
    throw OpError("input W has shape " + ShapeToString(w_shape) + ", expected a kernel of at least 1 x 1");
  // Attributes are arbitrary int64 values: every step is checked, as ONNX Runtime's Conv does.
  const int64_t eff_kh = CheckedAdd(CheckedMul(s.kernel_h - 1, a.dilation_h, "(kernel_h - 1) * dilation_h"), 1,
                                    "the dilated kernel height");
  const int64_t eff_kw = CheckedAdd(CheckedMul(s.kernel_w - 1, a.dilation_w, "(kernel_w - 1) * dilation_w"), 1,
                                    "the dilated kernel width");
  const int64_t padded_h = CheckedAdd(CheckedAdd(s.in_h, a.pad_top, "H + pad_top"), a.pad_bottom, "the padded height");
  const int64_t padded_w = CheckedAdd(CheckedAdd(s.in_w, a.pad_left, "W + pad_left"), a.pad_right, "the padded width");
  if (padded_h < eff_kh || padded_w < eff_kw)
    throw OpError("the padded input " + ShapeToString({padded_h, padded_w}) + " (input " +
                  ShapeToString({s.in_h, s.in_w}) + " plus pads) is smaller than the dilated kernel " +
                  ShapeToString({eff_kh, eff_kw}));
  s.out_h = (padded_h - eff_kh) / a.stride_h + 1;
  s.out_w = (padded_w - eff_kw) / a.stride_w + 1;
  // The gather tables hold int32 offsets inside one (padded) input plane and int32 output positions.
  if (CheckedMul(padded_h, padded_w, "the padded plane") >= std::numeric_limits<int32_t>::max())
    throw OpError("the padded input " + ShapeToString({padded_h, padded_w}) +
                  " has 2^31 pixels or more, which is not supported");
  if (CheckedMul(s.out_h, s.out_w, "the output plane") >= std::numeric_limits<int32_t>::max())
    throw OpError("the output " + ShapeToString({s.out_h, s.out_w}) + " has 2^31 positions or more, which is not supported");
  return s;
}

MaskPositions ComputeMaskPositions(const uint8_t* mask, const std::vector<int64_t>& mask_shape,
                                   int64_t out_h, int64_t out_w) {
  if (mask_shape.size() != 2 || mask_shape[0] != out_h || mask_shape[1] != out_w)
    throw OpError("input mask has shape " + ShapeToString(mask_shape) +
                  ", expected the convolution's output size [" + std::to_string(out_h) + ", " +
                  std::to_string(out_w) + "]");
  MaskPositions m;
  m.out_h = out_h;
  m.out_w = out_w;
  for (int64_t p = 0; p < out_h * out_w; ++p)
    if (mask[p]) m.positions.push_back(static_cast<int32_t>(p));
  if (m.positions.empty())
    throw OpError("input mask has no nonzero entry (K = 0): at least one position must be computed");
  return m;
}

InputIndex ReadInputIndex(const int64_t* index, const std::vector<int64_t>& index_shape,
                          const std::vector<int64_t>& x_shape) {
  if (index_shape.size() != 2)
    throw OpError("input X_index has shape " + ShapeToString(index_shape) + ", expected 2-D [H, W]");
  if (x_shape.size() != 3)
    throw OpError("input X has shape " + ShapeToString(x_shape) +
                  ", expected 3-D [N, C, K_in] (compact) when X_index is given");
  InputIndex result;
  result.in_h = index_shape[0];
  result.in_w = index_shape[1];
  result.compact_size = x_shape[2];
  const int64_t size = CheckedMul(result.in_h, result.in_w, "the size of X_index");
  result.values.resize(static_cast<size_t>(size));
  for (int64_t p = 0; p < size; ++p) {
    if (index[p] < 0 || index[p] >= result.compact_size)
      throw OpError("input X_index has value " + std::to_string(index[p]) + " at flat position " +
                    std::to_string(p) + ", expected a value in [0, K_in) with K_in = " +
                    std::to_string(result.compact_size) + " (the last dimension of X)");
    result.values[p] = static_cast<int32_t>(index[p]);
  }
  return result;
}

GatherTable BuildGatherTable(const ConvShape& s, const ConvAttributes& a, const MaskPositions& m,
                             const InputIndex* index) {
  GatherTable t;
  t.taps = s.taps();
  t.count = m.count();
  t.offsets.resize(static_cast<size_t>(t.taps * t.count));
  for (int64_t i = 0; i < s.kernel_h; ++i) {
    for (int64_t j = 0; j < s.kernel_w; ++j) {
      int32_t* row = t.offsets.data() + (i * s.kernel_w + j) * t.count;
      for (int64_t k = 0; k < t.count; ++k) {
        const int64_t oy = m.positions[k] / m.out_w, ox = m.positions[k] % m.out_w;
        const int64_t iy = oy * a.stride_h - a.pad_top + i * a.dilation_h;
        const int64_t ix = ox * a.stride_w - a.pad_left + j * a.dilation_w;
        const bool inside = iy >= 0 && iy < s.in_h && ix >= 0 && ix < s.in_w;
        const int64_t pixel = iy * s.in_w + ix;
        row[k] = !inside ? -1 : static_cast<int32_t>(index ? index->values[pixel] : pixel);
      }
    }
  }
  return t;
}

}  // namespace onnx_perforate
