// ORT side of the CPU kernels: reads inputs and attributes, caches what depends only on the mask, the
// index and the input size (the computed positions and gather table, see PlanKey) and calls the math in
// perforated_conv.cc / nn_interpolate.cc.
#include "cpu_ops.h"

#include <memory>
#include <mutex>
#include <type_traits>

#include "compact_pool.h"
#include "nn_interpolate.h"
#include "perforated_conv.h"

namespace onnx_perforate {

ParallelRunner MakeParallelRunner(const Ort::KernelContext& ctx) {
  return [&ctx](size_t total, const std::function<void(size_t)>& fn) {
    if (total == 1) {
      fn(0);
      return;
    }
    auto trampoline = [](void* data, size_t i) { (*static_cast<const std::function<void(size_t)>*>(data))(i); };
    ctx.ParallelFor(trampoline, total, 0, const_cast<std::function<void(size_t)>*>(&fn));
  };
}

namespace {

struct PerforatedConvKernel {
  PerforatedConvKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api), input_index_(info, 4) {
    KernelAttributes attrs(api, info);
    node_ = attrs.NodeName();
    attrs_ = ReadConvAttributes(attrs);
    constant_mask_ = ReadConstantInput(info, 3, [](const Ort::ConstValue& v) {
      return std::make_shared<const MaskInput>(ReadMaskInput(v));
    });
    int is_constant = 0;
    Ort::ConstKernelInfo(info).GetTensorConstantInput(1, &is_constant);
    packed_.SetConstant(is_constant != 0);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guarded(api_, "PerforatedConv", node_, [&] { Compute(context); });
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const PerforatedConvInputs in = GetPerforatedConvInputs(ctx);
    auto input_index = in.x_index ? input_index_.Read(in.x_index, in.x_shape) : nullptr;
    const ConvShape shape = ComputeConvShape(in.x_shape, in.w_shape, in.b ? &in.b_shape : nullptr, attrs_,
                                             input_index.get());
    auto mask = constant_mask_ ? constant_mask_ : std::make_shared<const MaskInput>(ReadMaskInput(in.mask));
    const auto plan = plans_.Get(MakePlanKey(shape, std::move(mask), std::move(input_index)), [&](const PlanKey& key) {
      return BuildCpuConvPlan(shape, attrs_,
                              ComputeMaskPositions(key.mask->values.data(), key.mask->shape, shape.out_h, shape.out_w),
                              key.input_index);
    });
    auto y = ctx.GetOutput(0, {shape.batch, shape.out_channels, plan->positions.count()});
    const float* weights = in.w.GetTensorData<float>();
    const auto packed = packed_.Get([&] { return PerforatedConvCpu::PackWeightsFor(shape, weights); });
    PerforatedConvCpu::Compute(shape, attrs_, *plan, in.x.GetTensorData<float>(), weights, packed.get(),
                               in.b ? in.b.GetTensorData<float>() : nullptr, y.GetTensorMutableData<float>(),
                               MakeParallelRunner(ctx));
  }

  const OrtApi& api_;
  std::string node_;
  ConvAttributes attrs_;
  std::shared_ptr<const MaskInput> constant_mask_;
  InputIndexReader input_index_;
  PlanCache<CpuConvPlan> plans_;
  PackedWeightsCache<PackedWeights> packed_;
};

// T: float (after PerforatedConv) or uint8_t (after PerforatedQLinearConv).
template <typename T>
struct NNInterpolateKernel : NNInterpolateKernelBase<NNInterpolateKernel<T>, T> {
  using NNInterpolateKernelBase<NNInterpolateKernel<T>, T>::NNInterpolateKernelBase;

  void Interpolate(const Ort::KernelContext& ctx, const std::shared_ptr<const InterpolationIndex>& index,
                   const T* yc, T* y, int64_t planes, int64_t count) {
    const auto plan = Plan(index);
    if constexpr (std::is_same_v<T, uint8_t> || std::is_same_v<T, int8_t>) {  // a byte gather either way
      NNInterpolateCpu::Compute(planes, count, index->values.data(), index->positions(),
                                reinterpret_cast<const uint8_t*>(yc), reinterpret_cast<uint8_t*>(y),
                                MakeParallelRunner(ctx), plan.get());
    } else {
      NNInterpolateCpu::Compute(planes, count, index->values.data(), index->positions(), yc, y, MakeParallelRunner(ctx),
                                plan.get());
    }
  }

  // The permute plan of this element type (nn_interpolate.h).
  using PermutePlanType = std::conditional_t<std::is_same_v<T, float>, FloatPermutePlan, BytePermutePlan>;

  // Planned once per index object: the base hands back the same object while the index values are
  // unchanged (see NNInterpolateKernelBase), so the address identifies the values.
  std::shared_ptr<const PermutePlanType> Plan(const std::shared_ptr<const InterpolationIndex>& index) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (planned_index_ != index) {
      if constexpr (std::is_same_v<T, float>)
        plan_ = NNInterpolateCpu::PlanFloats(index->values.data(), index->positions());
      else
        plan_ = NNInterpolateCpu::PlanBytes(index->values.data(), index->positions());
      planned_index_ = index;
    }
    return plan_;
  }

  std::mutex mutex_;
  std::shared_ptr<const InterpolationIndex> planned_index_;
  std::shared_ptr<const PermutePlanType> plan_;
};

// T: float, or uint8_t / int8_t (the compact outputs of PerforatedQLinearConv; max pooling only).
template <typename T>
struct CompactPoolKernel : CompactPoolKernelBase<CompactPoolKernel<T>> {
  using CompactPoolKernelBase<CompactPoolKernel<T>>::CompactPoolKernelBase;
  using CompactPoolKernelBase<CompactPoolKernel<T>>::attrs_;

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const CompactPoolInputs in = GetCompactPoolInputs(ctx);
    const auto table = Table(in);
    auto y = ctx.GetOutput(0, CompactPoolOutputShape(*table, in));
    if constexpr (std::is_same_v<T, float>)
      CompactPoolCpu::Compute(attrs_.mode, *table, in.x_shape[0] * in.x_shape[1], in.x.GetTensorData<T>(),
                              y.template GetTensorMutableData<T>(), MakeParallelRunner(ctx));
    else
      CompactPoolCpu::Compute(attrs_.mode, *table, in.x_shape[0], in.x_shape[1], in.x.GetTensorData<T>(),
                              y.template GetTensorMutableData<T>(), MakeParallelRunner(ctx));
  }

  // Built once per compact input size when X_index and Y_positions are initializers; else per call.
  std::shared_ptr<const PoolTable> Table(const CompactPoolInputs& in) {
    if (!this->constant_tables_) return ReadPoolTable(attrs_, in);
    std::lock_guard<std::mutex> lock(this->mutex_);
    if (!table_ || in.x_shape.size() != 3 || table_->compact_size != in.x_shape[2]) table_ = ReadPoolTable(attrs_, in);
    return table_;
  }

  std::shared_ptr<const PoolTable> table_;
};

// CPU ops run everything in CPU memory; PerforatedConv takes the optional X_index (implicit
// interpolation) as a fifth input.
struct PerforatedConvOp : PerforatedConvOpBase<PerforatedConvOp, PerforatedConvKernel, 5> {};
struct NNInterpolateOp : NNInterpolateOpBase<NNInterpolateOp, NNInterpolateKernel<float>> {};
struct NNInterpolateUint8Op
    : NNInterpolateOpBase<NNInterpolateUint8Op, NNInterpolateKernel<uint8_t>, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8> {};
struct NNInterpolateInt8Op
    : NNInterpolateOpBase<NNInterpolateInt8Op, NNInterpolateKernel<int8_t>, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8> {};
struct CompactPoolOp : CompactPoolOpBase<CompactPoolOp, CompactPoolKernel<float>> {};
struct CompactPoolUint8Op
    : CompactPoolOpBase<CompactPoolUint8Op, CompactPoolKernel<uint8_t>, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8> {};
struct CompactPoolInt8Op
    : CompactPoolOpBase<CompactPoolInt8Op, CompactPoolKernel<int8_t>, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8> {};

}  // namespace

void AddCpuOps(Ort::CustomOpDomain& domain) {
  static PerforatedConvOp perforated_conv;
  static NNInterpolateOp nn_interpolate;
  static NNInterpolateUint8Op nn_interpolate_uint8;  // one op, a kernel per element type
  static NNInterpolateInt8Op nn_interpolate_int8;
  static CompactPoolOp compact_pool;
  static CompactPoolUint8Op compact_pool_uint8;  // one op, a kernel per element type
  static CompactPoolInt8Op compact_pool_int8;
  domain.Add(&perforated_conv);
  domain.Add(&nn_interpolate);
  domain.Add(&nn_interpolate_uint8);
  domain.Add(&nn_interpolate_int8);
  domain.Add(&compact_pool);
  domain.Add(&compact_pool_uint8);
  domain.Add(&compact_pool_int8);
  AddQuantizedCpuOps(domain);
}

}  // namespace onnx_perforate
