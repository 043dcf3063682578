#include "pool_geometry.h"

#include <algorithm>
#include <limits>

namespace onnx_perforate {

PoolMode ParsePoolMode(const std::string& name) {
  if (name == "max") return PoolMode::kMax;
  if (name == "average") return PoolMode::kAverage;
  throw OpError("attribute 'mode' is '" + name + "', expected \"max\" or \"average\"");
}

void PoolAttributes::Validate() const {
  if (kernel_h < 1 || kernel_w < 1)
    throw OpError("attribute 'kernel_shape' is [" + std::to_string(kernel_h) + ", " + std::to_string(kernel_w) +
                  "], expected 2 positive values");
  if (stride_h < 1 || stride_w < 1 || dilation_h < 1 || dilation_w < 1)
    throw OpError("attributes 'strides' and 'dilations' must be >= 1");
  if (pad_top < 0 || pad_left < 0 || pad_bottom < 0 || pad_right < 0)
    throw OpError("attribute 'pads' must be >= 0");
  // Attributes are arbitrary int64 values: the window's extent is checked, as conv geometry is.
  const int64_t extent_h = CheckedAdd(CheckedMul(kernel_h - 1, dilation_h, "(kernel_h - 1) * dilation_h"), 1,
                                      "the dilated window height");
  const int64_t extent_w = CheckedAdd(CheckedMul(kernel_w - 1, dilation_w, "(kernel_w - 1) * dilation_w"), 1,
                                      "the dilated window width");
  if (CheckedMul(kernel_h, kernel_w, "the window size") >= std::numeric_limits<int32_t>::max())
    throw OpError("attribute 'kernel_shape' [" + std::to_string(kernel_h) + ", " + std::to_string(kernel_w) +
                  "] has 2^31 taps or more, which is not supported");
  if (pad_top >= extent_h || pad_bottom >= extent_h || pad_left >= extent_w || pad_right >= extent_w)
    throw OpError("attribute 'pads' must be smaller than the window ([" + std::to_string(extent_h) + ", " +
                  std::to_string(extent_w) + "] with dilations)");
  if (mode == PoolMode::kAverage && (dilation_h != 1 || dilation_w != 1))
    throw OpError("attribute 'dilations' must be [1, 1] for mode \"average\"");
}

int64_t PoolOutputSize(int64_t in, int64_t kernel, int64_t stride, int64_t pad_begin, int64_t pad_end,
                       int64_t dilation, bool ceil_mode) {
  // Overflow-free for the validated attributes (non-negative pads, positive strides, the window's extent
  // checked by Validate); the padded size is checked.
  const int64_t padded = CheckedAdd(CheckedAdd(in, pad_begin, "the input size + pad_begin"), pad_end, "the padded size");
  const int64_t span = padded - ((kernel - 1) * dilation + 1);
  if (span < 0) return 0;
  int64_t out = span / stride + 1;
  // ceil_mode adds the partial last window, unless it would start in the end padding
  if (ceil_mode && span % stride != 0 && CheckedMul(out, stride, "the ceil_mode window start") < in + pad_begin) ++out;
  return out;
}

PoolTable BuildPoolTable(const PoolAttributes& a, const InputIndex& index, const int64_t* y_positions,
                         int64_t y_count) {
  a.Validate();
  PoolTable t;
  t.in_h = index.in_h, t.in_w = index.in_w, t.compact_size = index.compact_size;
  t.out_h = PoolOutputSize(t.in_h, a.kernel_h, a.stride_h, a.pad_top, a.pad_bottom, a.dilation_h, a.ceil_mode);
  t.out_w = PoolOutputSize(t.in_w, a.kernel_w, a.stride_w, a.pad_left, a.pad_right, a.dilation_w, a.ceil_mode);
  if (t.out_h < 1 || t.out_w < 1)
    throw OpError("the pooling window does not fit the input grid [" + std::to_string(t.in_h) + ", " +
                  std::to_string(t.in_w) + "] (output size [" + std::to_string(t.out_h) + ", " +
                  std::to_string(t.out_w) + "])");
  const int64_t outputs = t.out_h * t.out_w;
  t.count = y_positions ? y_count : outputs;
  t.begin.reserve(static_cast<size_t>(t.count + 1));
  t.begin.push_back(0);
  std::vector<std::pair<int32_t, int32_t>> window;  // (compact entry, pixels showing it)
  window.reserve(static_cast<size_t>(a.kernel_h * a.kernel_w));
  for (int64_t o = 0; o < t.count; ++o) {
    const int64_t p = y_positions ? y_positions[o] : o;
    if (p < 0 || p >= outputs)
      throw OpError("input Y_positions has value " + std::to_string(p) + " at " + std::to_string(o) +
                    ", expected a value in [0, Ho*Wo) with [Ho, Wo] = [" + std::to_string(t.out_h) + ", " +
                    std::to_string(t.out_w) + "]");
    const int64_t y0 = (p / t.out_w) * a.stride_h - a.pad_top, x0 = (p % t.out_w) * a.stride_w - a.pad_left;
    window.clear();
    for (int64_t i = 0; i < a.kernel_h; ++i) {
      const int64_t y = y0 + i * a.dilation_h;
      if (y < 0 || y >= t.in_h) continue;
      for (int64_t j = 0; j < a.kernel_w; ++j) {
        const int64_t x = x0 + j * a.dilation_w;
        if (x < 0 || x >= t.in_w) continue;
        const int32_t entry = index.values[static_cast<size_t>(y * t.in_w + x)];
        auto found = std::find_if(window.begin(), window.end(), [&](const auto& e) { return e.first == entry; });
        if (found == window.end()) window.emplace_back(entry, 1);
        else ++found->second;
      }
    }
    if (window.empty())
      throw OpError("the pooling window of output position " + std::to_string(p) + " covers only padding");
    // The divisor follows ONNX Runtime: with count_include_pad, the window clipped to the padded input.
    float divisor = 0;
    if (a.mode == PoolMode::kAverage) {
      if (a.count_include_pad) {
        const int64_t y1 = std::min(y0 + a.kernel_h, t.in_h + a.pad_bottom);
        const int64_t x1 = std::min(x0 + a.kernel_w, t.in_w + a.pad_right);
        divisor = static_cast<float>((y1 - y0) * (x1 - x0));
      } else {
        for (const auto& e : window) divisor += static_cast<float>(e.second);
      }
    }
    std::sort(window.begin(), window.end());  // ascending entries: sequential reads of the compact plane
    for (const auto& e : window) {
      t.entries.push_back(e.first);
      if (a.mode == PoolMode::kAverage) t.weights.push_back(static_cast<float>(e.second) / divisor);
    }
    t.begin.push_back(static_cast<int32_t>(t.entries.size()));
  }
  for (int64_t o = 0; o < t.count; ++o) t.width = std::max(t.width, t.begin[o + 1] - t.begin[o]);
  t.padded_entries.resize(static_cast<size_t>(t.count * t.width));
  if (a.mode == PoolMode::kAverage) t.padded_weights.assign(static_cast<size_t>(t.count * t.width), 0.0f);
  for (int64_t o = 0; o < t.count; ++o) {
    for (int32_t j = 0; j < t.width; ++j) {
      const int32_t from = t.begin[o] + j < t.begin[o + 1] ? t.begin[o] + j : t.begin[o];
      t.padded_entries[o * t.width + j] = t.entries[from];
      if (a.mode == PoolMode::kAverage && from == t.begin[o] + j) t.padded_weights[o * t.width + j] = t.weights[from];
    }
  }
  return t;
}

}  // namespace onnx_perforate
