// ORT side of PerforatedQLinearConv on CPU: reads and checks the quantization inputs, caches what
// depends only on constant inputs (packed weights, the mask's positions) and calls the math in
// perforated_qlinear_conv.cc.
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "cpu_ops.h"
#include "perforated_qlinear_conv.h"

namespace onnx_perforate {

namespace {

constexpr const char* kOpName = "PerforatedQLinearConv";

// Input positions: QLinearConv's nine, then the mask and the optional compact-input index.
enum Input : size_t { kX, kXScale, kXZero, kW, kWScale, kWZero, kYScale, kYZero, kB, kMask, kXIndex, kInputs };

const char* InputName(size_t i) {
  static const char* names[] = {"x", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point",
                                "y_scale", "y_zero_point", "B", "mask", "X_index"};
  return names[i];
}

template <typename T>
std::vector<T> ReadValues(const Ort::ConstValue& value) {
  const T* data = value.GetTensorData<T>();
  return std::vector<T>(data, data + value.GetTensorTypeAndShapeInfo().GetElementCount());
}

// A per-tensor quantization parameter: one element (shape [] or [1]).
template <typename T>
T Scalar(const Ort::ConstValue& value, size_t input) {
  const auto shape = ShapeOf(value);
  if (value.GetTensorTypeAndShapeInfo().GetElementCount() != 1)
    throw OpError(std::string("input ") + InputName(input) + " has shape " + ShapeToString(shape) +
                  ", expected a scalar (per-tensor quantization)");
  return value.GetTensorData<T>()[0];
}

float Scale(const Ort::ConstValue& value, size_t input) {
  const float scale = Scalar<float>(value, input);
  if (!(scale > 0.0f) || !std::isfinite(scale))
    throw OpError(std::string("input ") + InputName(input) + " is " + std::to_string(scale) +
                  ", expected a positive finite scale");
  return scale;
}

// Bytes with the sign bit flipped: int8 <-> uint8 shifted by 128 (in place when out == in).
void FlipSignBits(const uint8_t* in, size_t size, uint8_t* out) {
  for (size_t i = 0; i < size; ++i) out[i] = in[i] ^ 0x80;
}

thread_local std::vector<uint8_t> tls_shifted_input;

// Integer output bounds of the fused activation: Relu and Clip commute with the monotone quantization,
// so they become a clamp of the quantized value.
void SetActivationBounds(const ConvAttributes& a, float y_scale, int32_t y_zero, Requantization& q) {
  auto quantize = [&](float v) {
    const double r = std::nearbyint(static_cast<double>(v) / y_scale) + y_zero;
    return static_cast<int32_t>(std::min(255.0, std::max(0.0, r)));
  };
  q.out_min = 0, q.out_max = 255;
  if (a.activation == Activation::kRelu) q.out_min = y_zero;
  if (a.activation == Activation::kClip) {
    q.out_min = quantize(a.clip_min);
    q.out_max = quantize(a.clip_max);
  }
}

// The computed positions, and where each one's pixels lie in the kernel's padded NHWC copy of X.
struct QuantizedPlan {
  std::shared_ptr<const InputIndex> input_index;
  std::shared_ptr<const BytePermutePlan> input_bytes;  // interpolating a compact X: NNInterpolateCpu::PlanBytes
  MaskPositions positions;
  PaddedGather padded;
};

struct PerforatedQLinearConvKernel {
  PerforatedQLinearConvKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api), input_index_(info, kXIndex) {
    KernelAttributes attrs(api, info);
    node_ = attrs.NodeName();
    attrs_ = ReadConvAttributes(attrs);
    if (attrs_.activation == Activation::kLeakyRelu)
      throw OpError("attribute 'activation' is 'LeakyRelu', expected \"\", \"Relu\" or \"Clip\" for a quantized convolution");
    constant_mask_ = ReadConstantInput(info, kMask, [](const Ort::ConstValue& v) {
      return std::make_shared<const MaskInput>(ReadMaskInput(v));
    });
    int is_constant = 0;
    Ort::ConstKernelInfo(info).GetTensorConstantInput(kW, &is_constant);
    packed_.SetConstant(is_constant != 0);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guarded(api_, kOpName, node_, [&] { Compute(context); });
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t inputs = ctx.GetInputCount();
    if (inputs != kInputs && inputs != kInputs - 1)
      throw OpError("expected 10 or 11 inputs (QLinearConv's nine, mask, X_index)");
    std::vector<Ort::ConstValue> in(kInputs);
    for (size_t i = 0; i < inputs; ++i) in[i] = ctx.GetInput(i);
    for (size_t i : {kX, kXScale, kXZero, kW, kWScale, kWZero, kYScale, kYZero, kMask})
      if (!in[i]) throw OpError(std::string("input ") + InputName(i) + " is required");

    // int8 activations (S8S8) run as uint8: x ^ 0x80 = x + 128 with zero point + 128, and likewise the
    // output (the requantization is the same, shifted by 128, so the result is exact).
    const bool signed_activations =
        in[kX].GetTensorTypeAndShapeInfo().GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    auto x_shape = ShapeOf(in[kX]);
    const auto w_shape = ShapeOf(in[kW]);
    // Without X_index, a 3-D x [N, C, K] is one row of K pixels: a compact tensor read by a 1x1
    // convolution with an all-ones [1, K] mask (docs/ops.md).
    if (!in[kXIndex] && x_shape.size() == 3) x_shape = {x_shape[0], x_shape[1], 1, x_shape[2]};
    const auto b_shape = in[kB] ? ShapeOf(in[kB]) : std::vector<int64_t>{};
    auto input_index = in[kXIndex] ? input_index_.Read(in[kXIndex], x_shape) : nullptr;
    const ConvShape shape = ComputeConvShape(x_shape, w_shape, in[kB] ? &b_shape : nullptr, attrs_, input_index.get());
    const Requantization requant = ReadRequantization(in, shape, signed_activations);
    auto mask = constant_mask_ ? constant_mask_ : std::make_shared<const MaskInput>(ReadMaskInput(in[kMask]));
    const auto plan = plans_.Get(MakePlanKey(shape, std::move(mask), std::move(input_index)), [&](const PlanKey& key) {
      auto plan = std::make_shared<QuantizedPlan>();
      plan->input_index = key.input_index;
      if (key.input_index)
        plan->input_bytes = NNInterpolateCpu::PlanBytes(key.input_index->values.data(), shape.in_h * shape.in_w);
      plan->positions = ComputeMaskPositions(key.mask->values.data(), key.mask->shape, shape.out_h, shape.out_w);
      // The kernel packs X itself: positions and taps are pixel offsets in the padded plane.
      plan->padded = BuildPaddedGather(shape, attrs_, plan->positions, nullptr);
      return std::shared_ptr<const QuantizedPlan>(std::move(plan));
    });
    const int64_t count = plan->positions.count();
    auto y = ctx.GetOutput(0, {shape.batch, shape.out_channels, count});
    const int8_t* w = in[kW].GetTensorData<int8_t>();
    const auto packed = packed_.Get([&] { return PerforatedQLinearConvCpu::PackWeights(shape, w, BestQuantizedGemmIsa()); });
    const uint8_t* x = in[kX].GetTensorData<uint8_t>();
    uint8_t* yc = y.GetTensorMutableData<uint8_t>();
    if (signed_activations) {
      const size_t size = in[kX].GetTensorTypeAndShapeInfo().GetElementCount();
      if (tls_shifted_input.size() < size) tls_shifted_input.resize(size);
      FlipSignBits(x, size, tls_shifted_input.data());
      x = tls_shifted_input.data();
    }
    PerforatedQLinearConvCpu::Compute(shape, attrs_, plan->padded, count, plan->input_index.get(),
                                      plan->input_bytes.get(), x, *packed, requant, yc, MakeParallelRunner(ctx));
    if (signed_activations) FlipSignBits(yc, static_cast<size_t>(shape.batch * shape.out_channels * count), yc);
  }

  Requantization ReadRequantization(const std::vector<Ort::ConstValue>& in, const ConvShape& s,
                                    bool signed_activations) const {
    Requantization q;
    const float x_scale = Scale(in[kXScale], kXScale), y_scale = Scale(in[kYScale], kYScale);
    if (signed_activations) {  // the uint8 equivalents: zero point + 128 (see Compute)
      q.x_zero_point = Scalar<int8_t>(in[kXZero], kXZero) + 128;
      q.y_zero_point = Scalar<int8_t>(in[kYZero], kYZero) + 128;
    } else {
      q.x_zero_point = Scalar<uint8_t>(in[kXZero], kXZero);
      q.y_zero_point = Scalar<uint8_t>(in[kYZero], kYZero);
    }
    const auto w_scales = ReadValues<float>(in[kWScale]);
    const auto w_zeros = ReadValues<int8_t>(in[kWZero]);
    const int64_t m = s.out_channels;
    auto per_channel = [&](size_t size, size_t input) {
      if (size != 1 && static_cast<int64_t>(size) != m)
        throw OpError(std::string("input ") + InputName(input) + " has shape " + ShapeToString(ShapeOf(in[input])) +
                      ", expected one value (per tensor) or " + std::to_string(m) + " (one per output channel)");
    };
    per_channel(w_scales.size(), kWScale);
    per_channel(w_zeros.size(), kWZero);
    if (std::any_of(w_zeros.begin(), w_zeros.end(), [](int8_t z) { return z != 0; })) {
      q.w_zero_points.resize(static_cast<size_t>(m));
      for (int64_t i = 0; i < m; ++i) q.w_zero_points[i] = w_zeros[w_zeros.size() == 1 ? 0 : i];
    }
    q.scales.resize(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) {
      const float w_scale = w_scales[w_scales.size() == 1 ? 0 : i];
      if (!(w_scale > 0.0f) || !std::isfinite(w_scale))
        throw OpError("input w_scale has value " + std::to_string(w_scale) + ", expected positive finite scales");
      q.scales[i] = x_scale * w_scale / y_scale;  // the order of ORT's QLinearConv (float arithmetic)
    }
    q.bias = in[kB] ? ReadValues<int32_t>(in[kB]) : std::vector<int32_t>(static_cast<size_t>(m), 0);
    SetActivationBounds(attrs_, y_scale, q.y_zero_point, q);
    return q;
  }

  const OrtApi& api_;
  std::string node_;
  ConvAttributes attrs_;
  std::shared_ptr<const MaskInput> constant_mask_;
  InputIndexReader input_index_;
  PlanCache<QuantizedPlan> plans_;
  PackedWeightsCache<PackedQuantizedWeights> packed_;
};

// The op's signature, for the CPU kernel and for the CUDA refusal below; one registration per
// activation type (uint8, int8), like NNInterpolate's per element type.
template <typename Derived, typename Kernel, ONNXTensorElementDataType kActivation = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8>
struct PerforatedQLinearConvOpBase : Ort::CustomOpBase<Derived, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return NewKernel<Kernel>(api, info, kernel, kOpName);
  }
  const char* GetName() const { return kOpName; }
  size_t GetInputTypeCount() const { return kInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case kX:
      case kXZero:
      case kYZero:
        return kActivation;
      case kW:
      case kWZero:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      case kB:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      case kMask:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // bool or uint8, checked in the kernel
      case kXIndex:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      default:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // the scales
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == kB || i == kXIndex ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kActivation; }
};

struct PerforatedQLinearConvOp : PerforatedQLinearConvOpBase<PerforatedQLinearConvOp, PerforatedQLinearConvKernel> {};
struct PerforatedQLinearConvInt8Op
    : PerforatedQLinearConvOpBase<PerforatedQLinearConvInt8Op, PerforatedQLinearConvKernel,
                                  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8> {};

// There is no CUDA kernel. Without a CUDA registration ORT would quietly run the node on the CPU, with
// copies to and from the GPU around it; registered for CUDAExecutionProvider, the node is placed there
// and session creation fails with this message, naming the node (NewKernel adds the op and node names).
struct CudaRefusalKernel {
  CudaRefusalKernel(const OrtApi&, const OrtKernelInfo*) {
    throw OpError(
        "has no CUDA kernel: INT8 perforation runs on the CPU only (a dp4a/IMMA kernel is not written yet). "
        "Run this model with providers=['CPUExecutionProvider'], or perforate the float model for the GPU");
  }
  OrtStatusPtr ComputeV2(OrtKernelContext*) { return nullptr; }  // never constructed
};

template <ONNXTensorElementDataType kActivation>
struct PerforatedQLinearConvCudaRefusal
    : PerforatedQLinearConvOpBase<PerforatedQLinearConvCudaRefusal<kActivation>, CudaRefusalKernel, kActivation> {
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
};

}  // namespace

void AddQuantizedCpuOps(Ort::CustomOpDomain& domain) {
  static PerforatedQLinearConvOp perforated_qlinear_conv;
  static PerforatedQLinearConvInt8Op perforated_qlinear_conv_int8;
  domain.Add(&perforated_qlinear_conv);
  domain.Add(&perforated_qlinear_conv_int8);
}

void AddQuantizedCudaRefusal(Ort::CustomOpDomain& domain) {
  static PerforatedQLinearConvCudaRefusal<ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8> refusal;
  static PerforatedQLinearConvCudaRefusal<ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8> refusal_int8;
  domain.Add(&refusal);
  domain.Add(&refusal_int8);
}

}  // namespace onnx_perforate
