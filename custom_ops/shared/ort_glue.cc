#include "ort_glue.h"

#include <algorithm>
#include <climits>

namespace onnx_perforate {

int64_t KernelAttributes::Int(const char* name, int64_t fallback) const {
  int64_t value = 0;
  if (OrtStatus* status = api_.KernelInfoGetAttribute_int64(info_, name, &value)) {
    api_.ReleaseStatus(status);
    return fallback;
  }
  return value;
}

float KernelAttributes::Float(const char* name, float fallback) const {
  float value = 0;
  if (OrtStatus* status = api_.KernelInfoGetAttribute_float(info_, name, &value)) {
    api_.ReleaseStatus(status);
    return fallback;
  }
  return value;
}

std::string KernelAttributes::String(const char* name, const std::string& fallback) const {
  size_t size = 0;
  if (OrtStatus* status = api_.KernelInfoGetAttribute_string(info_, name, nullptr, &size)) {
    api_.ReleaseStatus(status);
    return fallback;
  }
  std::string value(size, '\0');
  if (OrtStatus* status = api_.KernelInfoGetAttribute_string(info_, name, value.data(), &size)) {
    api_.ReleaseStatus(status);
    return fallback;
  }
  value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  return value;
}

std::vector<int64_t> KernelAttributes::Ints(const char* name) const {
  size_t size = 0;
  if (OrtStatus* status = api_.KernelInfoGetAttributeArray_int64(info_, name, nullptr, &size)) {
    api_.ReleaseStatus(status);
    return {};
  }
  std::vector<int64_t> values(size);
  if (size == 0) return values;
  if (OrtStatus* status = api_.KernelInfoGetAttributeArray_int64(info_, name, values.data(), &size)) {
    api_.ReleaseStatus(status);
    return {};
  }
  return values;
}

std::string KernelAttributes::NodeName() const {
  size_t size = 0;
  if (OrtStatus* status = api_.KernelInfo_GetNodeName(info_, nullptr, &size)) {
    api_.ReleaseStatus(status);
    return "?";
  }
  std::string value(size, '\0');
  if (OrtStatus* status = api_.KernelInfo_GetNodeName(info_, value.data(), &size)) {
    api_.ReleaseStatus(status);
    return "?";
  }
  value.resize(size > 0 ? size - 1 : 0);
  return value;
}

namespace {

std::vector<int64_t> PairOr(const std::vector<int64_t>& values, const char* name, int64_t fallback) {
  if (values.empty()) return {fallback, fallback};
  if (values.size() != 2)
    throw OpError(std::string("attribute '") + name + "' has " + std::to_string(values.size()) +
                  " values, expected 2 (only 2-D convolutions are supported)");
  return values;
}

}  // namespace

ConvAttributes ReadConvAttributes(const KernelAttributes& attrs) {
  ConvAttributes a;
  const auto kernel = attrs.Ints("kernel_shape");
  if (!kernel.empty()) {
    const auto k = PairOr(kernel, "kernel_shape", 0);
    a.kernel_h = k[0];
    a.kernel_w = k[1];
  }
  const auto strides = PairOr(attrs.Ints("strides"), "strides", 1);
  const auto dilations = PairOr(attrs.Ints("dilations"), "dilations", 1);
  a.stride_h = strides[0];
  a.stride_w = strides[1];
  a.dilation_h = dilations[0];
  a.dilation_w = dilations[1];
  const auto pads = attrs.Ints("pads");
  if (!pads.empty()) {
    if (pads.size() != 4)
      throw OpError("attribute 'pads' has " + std::to_string(pads.size()) +
                    " values, expected 4 [top, left, bottom, right]");
    a.pad_top = pads[0];
    a.pad_left = pads[1];
    a.pad_bottom = pads[2];
    a.pad_right = pads[3];
  }
  const std::string auto_pad = attrs.String("auto_pad", "NOTSET");
  if (auto_pad != "NOTSET" && auto_pad != "")
    throw OpError("attribute 'auto_pad' is '" + auto_pad + "', expected NOTSET with explicit 'pads'");
  a.group = attrs.Int("group", 1);
  a.activation = ParseActivation(attrs.String("activation", ""));
  a.alpha = attrs.Float("alpha", 0.01f);
  a.clip_min = attrs.Float("clip_min", a.clip_min);
  a.clip_max = attrs.Float("clip_max", a.clip_max);
  if (a.activation == Activation::kClip && a.clip_min > a.clip_max)
    throw OpError("attribute 'clip_min' is larger than 'clip_max'");
  return a;
}

PoolAttributes ReadPoolAttributes(const KernelAttributes& attrs) {
  PoolAttributes a;
  a.mode = ParsePoolMode(attrs.String("mode", ""));
  const auto kernel = attrs.Ints("kernel_shape");
  if (kernel.size() != 2)
    throw OpError("attribute 'kernel_shape' has " + std::to_string(kernel.size()) +
                  " values, expected 2 (only 2-D pooling is supported)");
  a.kernel_h = kernel[0];
  a.kernel_w = kernel[1];
  const auto strides = PairOr(attrs.Ints("strides"), "strides", 1);
  const auto dilations = PairOr(attrs.Ints("dilations"), "dilations", 1);
  a.stride_h = strides[0], a.stride_w = strides[1];
  a.dilation_h = dilations[0], a.dilation_w = dilations[1];
  const auto pads = attrs.Ints("pads");
  if (!pads.empty()) {
    if (pads.size() != 4)
      throw OpError("attribute 'pads' has " + std::to_string(pads.size()) +
                    " values, expected 4 [top, left, bottom, right]");
    a.pad_top = pads[0], a.pad_left = pads[1], a.pad_bottom = pads[2], a.pad_right = pads[3];
  }
  const std::string auto_pad = attrs.String("auto_pad", "NOTSET");
  if (auto_pad != "NOTSET" && auto_pad != "")
    throw OpError("attribute 'auto_pad' is '" + auto_pad + "', expected NOTSET with explicit 'pads'");
  const int64_t ceil_mode = attrs.Int("ceil_mode", 0), include_pad = attrs.Int("count_include_pad", 0);
  if ((ceil_mode != 0 && ceil_mode != 1) || (include_pad != 0 && include_pad != 1))
    throw OpError("attributes 'ceil_mode' and 'count_include_pad' must be 0 or 1");
  a.ceil_mode = ceil_mode == 1;
  a.count_include_pad = include_pad == 1;
  a.Validate();
  return a;
}

std::vector<int64_t> ShapeOf(const Ort::ConstValue& value) {
  return value.GetTensorTypeAndShapeInfo().GetShape();
}

std::vector<uint8_t> ReadMask(const Ort::ConstValue& mask) {
  const auto info = mask.GetTensorTypeAndShapeInfo();
  const auto type = info.GetElementType();
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL && type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
    throw OpError("input mask has element type " + std::to_string(static_cast<int>(type)) +
                  ", expected bool or uint8");
  const size_t count = info.GetElementCount();
  const auto* bytes = static_cast<const uint8_t*>(mask.GetTensorRawData());
  std::vector<uint8_t> result(count);
  for (size_t i = 0; i < count; ++i) result[i] = bytes[i] != 0;
  return result;
}

PerforatedConvInputs GetPerforatedConvInputs(const Ort::KernelContext& ctx) {
  const size_t inputs = ctx.GetInputCount();
  if (inputs != 4 && inputs != 5) throw OpError("expected 4 or 5 inputs (X, W, B or empty, mask, X_index)");
  PerforatedConvInputs in;
  in.x = ctx.GetInput(0), in.w = ctx.GetInput(1), in.b = ctx.GetInput(2), in.mask = ctx.GetInput(3);
  if (inputs == 5) in.x_index = ctx.GetInput(4);
  if (!in.x || !in.w || !in.mask) throw OpError("inputs X, W and mask are required");
  in.x_shape = ShapeOf(in.x);
  in.w_shape = ShapeOf(in.w);
  if (in.b) in.b_shape = ShapeOf(in.b);
  return in;
}

std::shared_ptr<const InputIndex> ReadInputIndexInput(const Ort::ConstValue& x_index,
                                                      const std::vector<int64_t>& x_shape) {
  return std::make_shared<const InputIndex>(
      ReadInputIndex(x_index.GetTensorData<int64_t>(), ShapeOf(x_index), x_shape));
}

InputIndexReader::InputIndexReader(const OrtKernelInfo* info, size_t input) {
  constant_ = Ort::ConstKernelInfo(info).GetInputCount() > input &&
              ReadConstantInput(info, input, [](const Ort::ConstValue& v) { return static_cast<bool>(v); });
}

std::shared_ptr<const InputIndex> InputIndexReader::Read(const Ort::ConstValue& x_index,
                                                         const std::vector<int64_t>& x_shape) {
  if (!constant_) return ReadInputIndexInput(x_index, x_shape);
  std::lock_guard<std::mutex> lock(mutex_);
  if (!cached_ || x_shape.size() != 3 || cached_->compact_size != x_shape[2])
    cached_ = ReadInputIndexInput(x_index, x_shape);
  return cached_;
}

std::vector<int64_t> GetCompactShape(const Ort::KernelContext& ctx) {
  const auto yc = ctx.GetInput(0), index = ctx.GetInput(1);
  if (!yc || !index) throw OpError("inputs Yc and index are required");
  const auto shape = ShapeOf(yc);
  if (shape.size() != 3) throw OpError("input Yc has shape " + ShapeToString(shape) + ", expected 3-D [N, M, K]");
  return shape;
}

MaskInput ReadMaskInput(const Ort::ConstValue& mask) { return MaskInput{ReadMask(mask), ShapeOf(mask)}; }

std::shared_ptr<const InterpolationIndex> ReadInterpolationIndex(const Ort::ConstValue& v) {
  const auto shape = ShapeOf(v);
  if (shape.size() != 2) throw OpError("input index has shape " + ShapeToString(shape) + ", expected 2-D [Ho, Wo]");
  const auto* data = v.GetTensorData<int64_t>();
  auto index = std::make_shared<InterpolationIndex>();
  index->shape = shape;
  const size_t n = static_cast<size_t>(shape[0] * shape[1]);
  index->raw.assign(data, data + n);
  index->values.resize(n);
  index->min = n ? data[0] : 0;
  index->max = n ? data[0] : 0;
  for (size_t i = 0; i < n; ++i) {
    index->min = std::min(index->min, data[i]);
    index->max = std::max(index->max, data[i]);
    // Clamped only so the conversion is defined: out-of-range values fail CheckRange before any use.
    index->values[i] = static_cast<int32_t>(std::max<int64_t>(std::min<int64_t>(data[i], INT32_MAX), INT32_MIN));
  }
  return index;
}

void InterpolationIndex::CheckRange(const std::vector<int64_t>& yc_shape) const {
  const int64_t count = yc_shape[2];
  if (positions() > 0 && (min < 0 || max >= count)) {
    const int64_t bad = min < 0 ? min : max;
    throw OpError("input index has value " + std::to_string(bad) + ", expected values in [0, K) with K = " +
                  std::to_string(count) + " (the last dimension of Yc " + ShapeToString(yc_shape) + ")");
  }
}

OrtStatusPtr MakeError(const OrtApi& api, const char* op, const std::string& node, const std::string& message) {
  const std::string text = std::string(op) + " node '" + node + "': " + message;
  return api.CreateStatus(ORT_INVALID_ARGUMENT, text.c_str());
}

}  // namespace onnx_perforate
