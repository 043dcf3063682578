// ONNX Runtime glue shared by the CPU and CUDA kernels: attribute reading, tensor helpers and the
// conversion of OpError into an ORT status. Host-compiler only (the ORT C++ headers are not nvcc-safe).
//
// The library never links libonnxruntime: the API table comes from the OrtApiBase* that ORT hands to
// RegisterCustomOps (ORT_API_MANUAL_INIT), at version kOrtApiVersion, so that one build loads in every
// ORT release from 1.21 on.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <memory>
#include <mutex>
#include <mutex>
#include <string>
#include <vector>

#include "conv_geometry.h"
#include "pool_geometry.h"

namespace onnx_perforate {

constexpr const char* kDomain = "onnx_perforate";
constexpr int kOrtApiVersion = 21;  // the headers' version; newer runtimes serve older API tables

// Attribute access. Each reader returns `fallback` only when the node has no attribute of that name;
// an attribute of another type throws OpError naming it, its type and the type expected.
class KernelAttributes {
 public:
  KernelAttributes(const OrtApi& api, const OrtKernelInfo* info) : api_(api), info_(info) {}
  int64_t Int(const char* name, int64_t fallback) const;
  float Float(const char* name, float fallback) const;
  std::string String(const char* name, const std::string& fallback) const;
  std::vector<int64_t> Ints(const char* name) const;  // empty when absent
  std::string NodeName() const;

 private:
  // The attribute's type ("int", "float", "string", "ints", "floats", "tensor"), or "" when absent.
  std::string TypeOf(const char* name) const;
  // Throws unless the attribute is absent (the caller's read failed).
  void RequireAbsent(const char* name, const char* expected) const;

  const OrtApi& api_;
  const OrtKernelInfo* info_;
};

// Reads and validates PerforatedConv's Conv-style attributes.
ConvAttributes ReadConvAttributes(const KernelAttributes& attrs);

// Reads and validates CompactPool's attributes.
PoolAttributes ReadPoolAttributes(const KernelAttributes& attrs);

std::vector<int64_t> ShapeOf(const Ort::ConstValue& value);

// "float", "bool", ... for error messages (ORT's enum value for the rare types).
std::string ElementTypeName(ONNXTensorElementDataType type);

// The mask input (bool or uint8) as 0/1 bytes.
std::vector<uint8_t> ReadMask(const Ort::ConstValue& mask);

// PerforatedConv's inputs, present where required: X, W, B (empty when absent), mask, X_index (empty
// when absent).
struct PerforatedConvInputs {
  Ort::ConstValue x, w, b, mask, x_index;
  std::vector<int64_t> x_shape, w_shape, b_shape;
};
PerforatedConvInputs GetPerforatedConvInputs(const Ort::KernelContext& ctx);

// X_index read and validated against the compact X (see conv_geometry.h).
std::shared_ptr<const InputIndex> ReadInputIndexInput(const Ort::ConstValue& x_index,
                                                      const std::vector<int64_t>& x_shape);

// A kernel's X_index input: when it is an initializer, read and validated once per compact input size
// (the same object is returned, so plans can compare it by pointer); otherwise on every call.
class InputIndexReader {
 public:
  InputIndexReader(const OrtKernelInfo* info, size_t input);
  std::shared_ptr<const InputIndex> Read(const Ort::ConstValue& x_index, const std::vector<int64_t>& x_shape);
  bool constant() const { return constant_; }

 private:
  bool constant_ = false;
  std::mutex mutex_;
  std::shared_ptr<const InputIndex> cached_;
};

// NNInterpolate's Yc input, checked to be 3-D [N, M, K]; with the index input, present.
std::vector<int64_t> GetCompactShape(const Ort::KernelContext& ctx);

// The mask input (bool or uint8) as 0/1 bytes with its shape.
struct MaskInput {
  std::vector<uint8_t> values;
  std::vector<int64_t> shape;
};
MaskInput ReadMaskInput(const Ort::ConstValue& mask);

// NNInterpolate's index input, converted once to the kernels' int32 and summarised for the range check.
struct InterpolationIndex {
  std::vector<int64_t> raw;  // as given, to compare a non-constant index with the previous one
  std::vector<int32_t> values;
  std::vector<int64_t> shape;
  int64_t min = 0, max = 0;
  int64_t positions() const { return shape[0] * shape[1]; }
  // Throws unless every value lies in [0, K), K = yc_shape[2].
  void CheckRange(const std::vector<int64_t>& yc_shape) const;
  // Whether `value` holds the same shape and values.
  bool Matches(const Ort::ConstValue& value) const;
};
std::shared_ptr<const InterpolationIndex> ReadInterpolationIndex(const Ort::ConstValue& index);

// What a PerforatedConv kernel's cached plan (the computed positions and the gather tables) depends on
// besides the node's attributes. CPU and CUDA compare keys alike, by value: a mask or X_index that is a
// graph input can come back with the same values in a new buffer (the plan is then reused, and on CUDA
// not uploaded again) or with new values in a reused buffer (it must not be), so buffer addresses cannot
// decide. The values are a few KiB compared on the host, microseconds per call; the pointers below are
// immutable host copies, so equal pointers skip the comparison (constant inputs are read once).
struct PlanKey {
  int64_t in_h = 0, in_w = 0, in_plane = 0, kernel_h = 0, kernel_w = 0, in_channels_per_group = 0;
  int device = -1;  // the CUDA device holding the tables; -1 on the CPU
  std::shared_ptr<const MaskInput> mask;
  std::shared_ptr<const InputIndex> input_index;  // null when X is not compact
  bool operator==(const PlanKey& other) const;
};
PlanKey MakePlanKey(const ConvShape& shape, std::shared_ptr<const MaskInput> mask,
                    std::shared_ptr<const InputIndex> input_index, int device = -1);

// A kernel's last plan, rebuilt when the key changes. Safe for concurrent Run calls of one session.
template <typename Plan>
class PlanCache {
 public:
  template <typename Build>
  std::shared_ptr<const Plan> Get(PlanKey key, Build&& build) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!plan_ || !(key == key_)) {
      plan_ = build(key);
      key_ = std::move(key);
    }
    return plan_;
  }

 private:
  std::mutex mutex_;
  PlanKey key_;
  std::shared_ptr<const Plan> plan_;
};

// A constant input (an initializer) read once at kernel creation, or an empty result.
template <typename Read>
auto ReadConstantInput(const OrtKernelInfo* info, size_t index, Read&& read) -> decltype(read(Ort::ConstValue{})) {
  int is_constant = 0;
  Ort::ConstValue value = Ort::ConstKernelInfo(info).GetTensorConstantInput(index, &is_constant);
  if (!is_constant || !value) return {};
  return read(value);
}

// Builds the status ORT reports for a failed kernel: "<Op> node '<name>': <message>".
OrtStatusPtr MakeError(const OrtApi& api, const char* op, const std::string& node, const std::string& message);

// Runs body, turning exceptions into an error status that names the op and the node.
template <typename Body>
OrtStatusPtr Guarded(const OrtApi& api, const char* op, const std::string& node, Body&& body) {
  try {
    body();
    return nullptr;
  } catch (const std::exception& e) {
    return MakeError(api, op, node, e.what());
  } catch (...) {
    return MakeError(api, op, node, "unknown error");
  }
}

// CreateKernelV2 of every op: a failing constructor becomes an error status naming the op and the node.
template <typename Kernel>
OrtStatusPtr NewKernel(const OrtApi& api, const OrtKernelInfo* info, void** kernel, const char* op) {
  return Guarded(api, op, KernelAttributes(api, info).NodeName(), [&] { *kernel = new Kernel(api, info); });
}

// What the CPU and CUDA NNInterpolate kernels share: the node name, the index (read once when it is an
// initializer, otherwise re-read only when its values change), the checks and the output. Derived
// implements Interpolate(ctx, index, yc, y, planes, count), called with planes > 0 and positions > 0;
// an unchanged non-constant index comes back as the same object, so Derived may cache by its address.
// T: the element type of Yc and Y.
template <typename Derived, typename T = float>
class NNInterpolateKernelBase {
 public:
  NNInterpolateKernelBase(const OrtApi& api, const OrtKernelInfo* info)
      : api_(api),
        node_(KernelAttributes(api, info).NodeName()),
        constant_index_(ReadConstantInput(info, 1, ReadInterpolationIndex)) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guarded(api_, "NNInterpolate", node_, [&] {
      Ort::KernelContext ctx(context);
      const auto yc_shape = GetCompactShape(ctx);
      const auto index = constant_index_ ? constant_index_ : LatestIndex(ctx.GetInput(1));
      index->CheckRange(yc_shape);
      auto y = ctx.GetOutput(0, {yc_shape[0], yc_shape[1], index->shape[0], index->shape[1]});
      const int64_t planes = yc_shape[0] * yc_shape[1];
      if (planes == 0 || index->positions() == 0) return;
      static_cast<Derived*>(this)->Interpolate(ctx, index, ctx.GetInput(0).template GetTensorData<T>(),
                                               y.template GetTensorMutableData<T>(), planes, yc_shape[2]);
    });
  }

 private:
  std::shared_ptr<const InterpolationIndex> LatestIndex(const Ort::ConstValue& value) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!latest_index_ || !latest_index_->Matches(value)) latest_index_ = ReadInterpolationIndex(value);
    return latest_index_;
  }

  const OrtApi& api_;
  const std::string node_;
  const std::shared_ptr<const InterpolationIndex> constant_index_;
  std::mutex mutex_;
  std::shared_ptr<const InterpolationIndex> latest_index_;
};

// The op descriptors' shared part, per op: names, types and optional inputs. The CPU and CUDA
// descriptors derive from these and add their execution provider and input memory types.
template <typename Op, typename Kernel, size_t kInputs>
struct PerforatedConvOpBase : Ort::CustomOpBase<Op, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return NewKernel<Kernel>(api, info, kernel, "PerforatedConv");
  }
  const char* GetName() const { return "PerforatedConv"; }
  size_t GetInputTypeCount() const { return kInputs; }  // X, W, B, mask[, X_index]
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // bool or uint8, checked in the kernel
    return i == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 2 || i == 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// kType: the element type of Yc and Y (float, or uint8 for quantized models; one descriptor per type).
template <typename Op, typename Kernel, ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>
struct NNInterpolateOpBase : Ort::CustomOpBase<Op, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return NewKernel<Kernel>(api, info, kernel, "NNInterpolate");
  }
  const char* GetName() const { return "NNInterpolate"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : kType;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kType; }
};

// CompactPool's inputs: X, X_index, Y_positions (empty when absent; X_index and Y_positions in CPU memory).
struct CompactPoolInputs {
  Ort::ConstValue x, x_index, y_positions;
  std::vector<int64_t> x_shape;
};
CompactPoolInputs GetCompactPoolInputs(const Ort::KernelContext& ctx);

// Whether X_index and Y_positions (when present) are initializers: the table is then built once per
// compact input size.
bool CompactPoolTablesConstant(const OrtKernelInfo* info);

// The window table of one call, validated against X (pool_geometry.h).
std::shared_ptr<const PoolTable> ReadPoolTable(const PoolAttributes& attrs, const CompactPoolInputs& in);

// Y's shape: [N, C, Ho, Wo], or [N, C, K_out] with Y_positions.
std::vector<int64_t> CompactPoolOutputShape(const PoolTable& table, const CompactPoolInputs& in);

// What the CPU and CUDA kernels of CompactPool share: the node name, the attributes, whether the table
// can be cached (X_index and Y_positions are initializers), and ORT's entry point (Kernel::Compute).
struct CompactPoolState {
  CompactPoolState(const OrtApi& api, const OrtKernelInfo* info);
  const OrtApi& api_;
  std::string node_;
  PoolAttributes attrs_;
  bool constant_tables_ = false;
  std::mutex mutex_;
};

template <typename Kernel>
struct CompactPoolKernelBase : CompactPoolState {
  using CompactPoolState::CompactPoolState;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guarded(api_, "CompactPool", node_, [&] { static_cast<Kernel*>(this)->Compute(context); });
  }
};

// CompactPool(X, X_index, Y_positions?) -> Y (docs/ops.md); kType: X's and Y's element type (one
// descriptor per type, as NNInterpolate).
template <typename Op, typename Kernel, ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>
struct CompactPoolOpBase : Ort::CustomOpBase<Op, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return NewKernel<Kernel>(api, info, kernel, "CompactPool");
  }
  const char* GetName() const { return "CompactPool"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? kType : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kType; }
};

}  // namespace onnx_perforate
