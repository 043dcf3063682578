// ORT side of the CPU kernels: reads inputs and attributes, caches what depends only on constant
// inputs (the mask's positions, the gather table, the interpolation index) and calls the math in
// perforated_conv.cc / nn_interpolate.cc.
#include "cpu_ops.h"

#include <memory>
#include <mutex>

#include "compact_pool.h"
#include "nn_interpolate.h"
#include "perforated_conv.h"

namespace onnx_perforate {

namespace {

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

// What PerforatedConv derives from the mask and the input size.
struct ConvPlan {
  int64_t in_h, in_w, in_plane, kernel_h, kernel_w;
  std::shared_ptr<const InputIndex> input_index;  // set when X is compact
  MaskPositions positions;
  GatherTable table;
  PaddedGather padded;
};

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
    constant_weights_ = is_constant != 0;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guarded(api_, "PerforatedConv", node_, [&] { Compute(context); });
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const PerforatedConvInputs in = GetPerforatedConvInputs(ctx);
    const auto input_index = in.x_index ? input_index_.Read(in.x_index, in.x_shape) : nullptr;
    const ConvShape shape = ComputeConvShape(in.x_shape, in.w_shape, in.b ? &in.b_shape : nullptr, attrs_,
                                             input_index.get());
    const std::shared_ptr<const ConvPlan> plan = Plan(shape, in.mask, input_index);
    const int64_t count = plan->positions.count();
    auto y = ctx.GetOutput(0, {shape.batch, shape.out_channels, count});
    const float* weights = in.w.GetTensorData<float>();
    const auto packed = Packed(shape, weights);
    PerforatedConvCpu::Compute(shape, attrs_, plan->table, plan->padded, plan->input_index.get(),
                               in.x.GetTensorData<float>(), weights, packed.get(),
                               in.b ? in.b.GetTensorData<float>() : nullptr, y.GetTensorMutableData<float>(),
                               MakeParallelRunner(ctx));
  }

  // Weights that are initializers are packed once; others on every call.
  std::shared_ptr<const PackedWeights> Packed(const ConvShape& s, const float* w) {
    if (!constant_weights_) return PerforatedConvCpu::PackWeightsFor(s, w);
    std::lock_guard<std::mutex> lock(mutex_);
    if (!packed_ready_) {
      packed_ = PerforatedConvCpu::PackWeightsFor(s, w);
      packed_ready_ = true;
    }
    return packed_;
  }

  std::shared_ptr<const ConvPlan> Plan(const ConvShape& s, const Ort::ConstValue& mask,
                                       const std::shared_ptr<const InputIndex>& input_index) {
    auto build = [&](const MaskInput& m) {
      auto plan = std::make_shared<ConvPlan>();
      plan->in_h = s.in_h, plan->in_w = s.in_w, plan->in_plane = s.in_plane;
      plan->kernel_h = s.kernel_h, plan->kernel_w = s.kernel_w;
      plan->input_index = input_index;
      plan->positions = ComputeMaskPositions(m.values.data(), m.shape, s.out_h, s.out_w);
      plan->table = BuildGatherTable(s, attrs_, plan->positions, input_index.get());
      plan->padded = BuildPaddedGather(s, attrs_, plan->positions, input_index.get());
      return plan;
    };
    const bool index_constant = !input_index || input_index_.constant();
    if (!constant_mask_ || !index_constant) return build(ReadMaskInput(mask));
    std::lock_guard<std::mutex> lock(mutex_);
    if (!plan_ || plan_->in_h != s.in_h || plan_->in_w != s.in_w || plan_->in_plane != s.in_plane ||
        plan_->kernel_h != s.kernel_h || plan_->kernel_w != s.kernel_w || plan_->input_index != input_index)
      plan_ = build(*constant_mask_);
    return plan_;
  }

  const OrtApi& api_;
  std::string node_;
  ConvAttributes attrs_;
  std::shared_ptr<const MaskInput> constant_mask_;
  InputIndexReader input_index_;
  std::mutex mutex_;
  std::shared_ptr<const ConvPlan> plan_;
  bool constant_weights_ = false;
  bool packed_ready_ = false;
  std::shared_ptr<const PackedWeights> packed_;
};

struct NNInterpolateKernel {
  NNInterpolateKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api) {
    node_ = KernelAttributes(api, info).NodeName();
    constant_index_ = ReadConstantInput(info, 1, ReadInterpolationIndex);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guarded(api_, "NNInterpolate", node_, [&] { Compute(context); });
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const auto yc_shape = GetCompactShape(ctx);
    const auto yc = ctx.GetInput(0);
    const auto index = constant_index_ ? constant_index_ : ReadInterpolationIndex(ctx.GetInput(1));
    index->CheckRange(yc_shape);
    const int64_t count = yc_shape[2], positions = index->positions();
    auto y = ctx.GetOutput(0, {yc_shape[0], yc_shape[1], index->shape[0], index->shape[1]});
    NNInterpolateCpu::Compute(yc_shape[0] * yc_shape[1], count, index->values.data(), positions,
                              yc.GetTensorData<float>(), y.GetTensorMutableData<float>(), MakeParallelRunner(ctx));
  }

  const OrtApi& api_;
  std::string node_;
  std::shared_ptr<const InterpolationIndex> constant_index_;
};

struct CompactPoolKernel {
  CompactPoolKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api) {
    KernelAttributes attrs(api, info);
    node_ = attrs.NodeName();
    attrs_ = ReadPoolAttributes(attrs);
    const size_t inputs = Ort::ConstKernelInfo(info).GetInputCount();
    constant_tables_ = ReadConstantInput(info, 1, [](const Ort::ConstValue& v) { return true; }) &&
                       (inputs < 3 || ReadConstantInput(info, 2, [](const Ort::ConstValue& v) { return true; }));
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guarded(api_, "CompactPool", node_, [&] { Compute(context); });
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t inputs = ctx.GetInputCount();
    const auto x = ctx.GetInput(0), x_index = ctx.GetInput(1);
    const Ort::ConstValue y_positions = inputs > 2 ? ctx.GetInput(2) : Ort::ConstValue{};
    if (!x || !x_index) throw OpError("inputs X and X_index are required");
    const auto x_shape = ShapeOf(x);
    const auto table = Table(x_shape, x_index, y_positions);
    const std::vector<int64_t> y_shape = y_positions ? std::vector<int64_t>{x_shape[0], x_shape[1], table->count}
                                                     : std::vector<int64_t>{x_shape[0], x_shape[1], table->out_h, table->out_w};
    auto y = ctx.GetOutput(0, y_shape);
    CompactPoolCpu::Compute(attrs_.mode, *table, x_shape[0] * x_shape[1], x.GetTensorData<float>(),
                            y.GetTensorMutableData<float>(), MakeParallelRunner(ctx));
  }

  // Built once per compact input size when X_index and Y_positions are initializers; else per call.
  std::shared_ptr<const PoolTable> Table(const std::vector<int64_t>& x_shape, const Ort::ConstValue& x_index,
                                         const Ort::ConstValue& y_positions) {
    auto build = [&] {
      const InputIndex index = ReadInputIndex(x_index.GetTensorData<int64_t>(), ShapeOf(x_index), x_shape);
      if (!y_positions) return std::make_shared<const PoolTable>(BuildPoolTable(attrs_, index, nullptr, 0));
      const auto shape = ShapeOf(y_positions);
      if (shape.size() != 1)
        throw OpError("input Y_positions has shape " + ShapeToString(shape) + ", expected 1-D [K_out]");
      return std::make_shared<const PoolTable>(
          BuildPoolTable(attrs_, index, y_positions.GetTensorData<int64_t>(), shape[0]));
    };
    if (!constant_tables_) return build();
    std::lock_guard<std::mutex> lock(mutex_);
    if (!table_ || x_shape.size() != 3 || table_->compact_size != x_shape[2]) table_ = build();
    return table_;
  }

  const OrtApi& api_;
  std::string node_;
  PoolAttributes attrs_;
  bool constant_tables_ = false;
  std::mutex mutex_;
  std::shared_ptr<const PoolTable> table_;
};

// CPU ops run everything in CPU memory; PerforatedConv takes the optional X_index (implicit
// interpolation) as a fifth input.
struct PerforatedConvOp : PerforatedConvOpBase<PerforatedConvOp, PerforatedConvKernel, 5> {};
struct NNInterpolateOp : NNInterpolateOpBase<NNInterpolateOp, NNInterpolateKernel> {};
struct CompactPoolOp : CompactPoolOpBase<CompactPoolOp, CompactPoolKernel> {};

}  // namespace

void AddCpuOps(Ort::CustomOpDomain& domain) {
  static PerforatedConvOp perforated_conv;
  static NNInterpolateOp nn_interpolate;
  static CompactPoolOp compact_pool;
  domain.Add(&perforated_conv);
  domain.Add(&nn_interpolate);
  domain.Add(&compact_pool);
}

}  // namespace onnx_perforate
