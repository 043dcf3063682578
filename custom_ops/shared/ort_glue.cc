#include "ort_glue.h"

#include <algorithm>
#include <climits>
#include <cstring>

namespace onnx_perforate {

namespace {

// True for a successful call; a failure's status is released.
bool Succeeded(const OrtApi& api, OrtStatus* status) {
  if (!status) return true;
  api.ReleaseStatus(status);
  return false;
}

}  // namespace

// ORT's C API fails alike for a missing attribute and for one of another type, so after a failed read
// this asks the other getters: an attribute that one of them reads exists. The array getters succeed
// for an attribute of any type (they copy its list field, empty for a scalar), so they come last and
// count only when they return values.
std::string KernelAttributes::TypeOf(const char* name) const {
  int64_t i = 0;
  float f = 0;
  size_t size = 0;
  if (Succeeded(api_, api_.KernelInfoGetAttribute_int64(info_, name, &i))) return "int";
  if (Succeeded(api_, api_.KernelInfoGetAttribute_float(info_, name, &f))) return "float";
  if (Succeeded(api_, api_.KernelInfoGetAttribute_string(info_, name, nullptr, &size))) return "string";
  OrtAllocator* allocator = nullptr;
  OrtValue* tensor = nullptr;
  if (Succeeded(api_, api_.GetAllocatorWithDefaultOptions(&allocator)) &&
      Succeeded(api_, api_.KernelInfoGetAttribute_tensor(info_, name, allocator, &tensor))) {
    api_.ReleaseValue(tensor);
    return "tensor";
  }
  size = 0;
  if (Succeeded(api_, api_.KernelInfoGetAttributeArray_int64(info_, name, nullptr, &size)) && size > 0) return "ints";
  size = 0;
  if (Succeeded(api_, api_.KernelInfoGetAttributeArray_float(info_, name, nullptr, &size)) && size > 0)
    return "floats";
  return "";
}

void KernelAttributes::RequireAbsent(const char* name, const char* expected) const {
  const std::string type = TypeOf(name);
  if (!type.empty())
    throw OpError(std::string("attribute '") + name + "' is of type " + type + ", expected " + expected);
}

int64_t KernelAttributes::Int(const char* name, int64_t fallback) const {
  int64_t value = 0;
  if (Succeeded(api_, api_.KernelInfoGetAttribute_int64(info_, name, &value))) return value;
  RequireAbsent(name, "int");
  return fallback;
}

float KernelAttributes::Float(const char* name, float fallback) const {
  float value = 0;
  if (Succeeded(api_, api_.KernelInfoGetAttribute_float(info_, name, &value))) return value;
  RequireAbsent(name, "float");
  return fallback;
}

std::string KernelAttributes::String(const char* name, const std::string& fallback) const {
  size_t size = 0;
  if (!Succeeded(api_, api_.KernelInfoGetAttribute_string(info_, name, nullptr, &size))) {
    RequireAbsent(name, "string");
    return fallback;
  }
  std::string value(size, '\0');
  if (!Succeeded(api_, api_.KernelInfoGetAttribute_string(info_, name, value.data(), &size)))
    throw OpError(std::string("attribute '") + name + "' could not be read");
  value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  return value;
}

std::vector<int64_t> KernelAttributes::Ints(const char* name) const {
  size_t size = 0;
  if (!Succeeded(api_, api_.KernelInfoGetAttributeArray_int64(info_, name, nullptr, &size)) || size == 0) {
    // Absent, or no list of ints (an empty list, or another type: see TypeOf).
    const std::string type = TypeOf(name);
    if (!type.empty() && type != "ints")
      throw OpError(std::string("attribute '") + name + "' is of type " + type + ", expected ints");
    return {};
  }
  std::vector<int64_t> values(size);
  if (!Succeeded(api_, api_.KernelInfoGetAttributeArray_int64(info_, name, values.data(), &size)))
    throw OpError(std::string("attribute '") + name + "' could not be read");
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
    if (k[0] < 1 || k[1] < 1)  // 0 would read as "from W" below
      throw OpError("attribute 'kernel_shape' is " + ShapeToString(k) + ", expected 2 positive values (W's kH, kW)");
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

CompactPoolInputs GetCompactPoolInputs(const Ort::KernelContext& ctx) {
  const size_t inputs = ctx.GetInputCount();
  if (inputs != 2 && inputs != 3) throw OpError("expected 2 or 3 inputs (X, X_index, Y_positions)");
  CompactPoolInputs in;
  in.x = ctx.GetInput(0), in.x_index = ctx.GetInput(1);
  if (inputs == 3) in.y_positions = ctx.GetInput(2);
  if (!in.x || !in.x_index) throw OpError("inputs X and X_index are required");
  in.x_shape = ShapeOf(in.x);
  return in;
}

bool CompactPoolTablesConstant(const OrtKernelInfo* info) {
  const auto constant = [](const Ort::ConstValue&) { return true; };
  return ReadConstantInput(info, 1, constant) &&
         (Ort::ConstKernelInfo(info).GetInputCount() < 3 || ReadConstantInput(info, 2, constant));
}

std::shared_ptr<const PoolTable> ReadPoolTable(const PoolAttributes& attrs, const CompactPoolInputs& in) {
  const InputIndex index = ReadInputIndex(in.x_index.GetTensorData<int64_t>(), ShapeOf(in.x_index), in.x_shape);
  if (!in.y_positions) return std::make_shared<const PoolTable>(BuildPoolTable(attrs, index, nullptr, 0));
  const auto shape = ShapeOf(in.y_positions);
  if (shape.size() != 1 || shape[0] < 1)
    throw OpError("input Y_positions has shape " + ShapeToString(shape) + ", expected 1-D [K_out] with K_out >= 1");
  return std::make_shared<const PoolTable>(
      BuildPoolTable(attrs, index, in.y_positions.GetTensorData<int64_t>(), shape[0]));
}

std::vector<int64_t> CompactPoolOutputShape(const PoolTable& table, const CompactPoolInputs& in) {
  if (in.y_positions) return {in.x_shape[0], in.x_shape[1], table.count};
  return {in.x_shape[0], in.x_shape[1], table.out_h, table.out_w};
}

CompactPoolState::CompactPoolState(const OrtApi& api, const OrtKernelInfo* info) : api_(api) {
  KernelAttributes attrs(api, info);
  node_ = attrs.NodeName();
  attrs_ = ReadPoolAttributes(attrs);
  constant_tables_ = CompactPoolTablesConstant(info);
}

std::string ElementTypeName(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "string";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return "uint32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "uint64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    default: return "type " + std::to_string(static_cast<int>(type));
  }
}

std::vector<int64_t> ShapeOf(const Ort::ConstValue& value) {
  return value.GetTensorTypeAndShapeInfo().GetShape();
}

std::vector<uint8_t> ReadMask(const Ort::ConstValue& mask) {
  const auto info = mask.GetTensorTypeAndShapeInfo();
  const auto type = info.GetElementType();
  if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL && type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
    throw OpError("input mask has element type " + ElementTypeName(type) + ", expected bool or uint8");
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

bool InterpolationIndex::Matches(const Ort::ConstValue& value) const {
  return ShapeOf(value) == shape &&
         std::memcmp(raw.data(), value.GetTensorData<int64_t>(), raw.size() * sizeof(int64_t)) == 0;
}

bool PlanKey::operator==(const PlanKey& o) const {
  const bool same_mask = mask == o.mask || (mask && o.mask && mask->shape == o.mask->shape &&
                                            mask->values == o.mask->values);
  const bool same_index = input_index == o.input_index ||
                          (input_index && o.input_index && input_index->in_h == o.input_index->in_h &&
                           input_index->in_w == o.input_index->in_w &&
                           input_index->compact_size == o.input_index->compact_size &&
                           input_index->values == o.input_index->values);
  return in_h == o.in_h && in_w == o.in_w && in_plane == o.in_plane && kernel_h == o.kernel_h &&
         kernel_w == o.kernel_w && in_channels_per_group == o.in_channels_per_group && device == o.device &&
         same_mask && same_index;
}

PlanKey MakePlanKey(const ConvShape& s, std::shared_ptr<const MaskInput> mask,
                    std::shared_ptr<const InputIndex> input_index, int device) {
  PlanKey key;
  key.in_h = s.in_h, key.in_w = s.in_w, key.in_plane = s.in_plane;
  key.kernel_h = s.kernel_h, key.kernel_w = s.kernel_w;
  key.in_channels_per_group = s.in_channels_per_group();
  key.device = device;
  key.mask = std::move(mask);
  key.input_index = std::move(input_index);
  return key;
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
