// ORT side of the CUDA kernels: reads inputs and attributes, keeps the tables that depend only on the
// mask / index (and the input size) on the device, and launches the kernels of kernels.h on ORT's
// compute stream.
//
// Rules: the mask and index inputs are requested in CPU memory, so the tables are built on the host
// with the shared geometry code and uploaded once; their device copies are cached per kernel (no
// cudaMalloc in the steady state, only when the input size, mask, index or device changes); every
// launch and copy goes to KernelContext::GetGPUComputeStream(), never the default stream; nothing
// synchronises the device in the hot path. Building a plan synchronises its stream once, so that a
// concurrent Run() on another stream that finds the cached plan never launches before the upload
// has landed.
#include "cuda_ops.h"

#include <cuda_runtime_api.h>

#include <climits>
#include <memory>
#include <mutex>

#include "../cpu/cpu_ops.h"
#include "kernels.h"
#include "pool_kernels.h"

namespace onnx_perforate {

namespace {

constexpr const char* kProvider = "CUDAExecutionProvider";

void Check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) throw OpError(std::string(what) + " failed: " + cudaGetErrorString(error));
}

int CurrentDevice() {
  int device = 0;
  Check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

cudaStream_t ComputeStream(const Ort::KernelContext& ctx) {
  void* stream = ctx.GetGPUComputeStream();
  if (!stream) throw OpError("ONNX Runtime gave no CUDA compute stream to the kernel");
  return static_cast<cudaStream_t>(stream);
}

int ToInt(int64_t value, const char* what) {
  if (value < 0 || value > INT_MAX) throw OpError(std::string(what) + " = " + std::to_string(value) + " does not fit the CUDA kernels' 32-bit sizes");
  return static_cast<int>(value);
}

// Device memory owned by a cached plan. The plan outlives every launch that reads it on its stream
// except across a plan change, where cudaFree's implicit synchronisation covers the pending work.
// Upload returns once the data is on the device: the copy is queued on the kernel's stream (ordered
// after that stream's earlier work) and the stream is synchronised. This happens only when a plan is
// built; other streams may read the buffer as soon as the plan is published.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);  // errors ignored: may run while the process tears the runtime down
  }
  void Upload(const void* host, size_t bytes, cudaStream_t stream) {
    Check(cudaMalloc(&ptr_, bytes ? bytes : 1), "cudaMalloc");
    Check(cudaMemcpyAsync(ptr_, host, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    Check(cudaStreamSynchronize(stream), "cudaStreamSynchronize after the table upload");
  }
  template <typename T>
  const T* get() const {
    return static_cast<const T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
};

// What PerforatedConv derives from the mask and the input size, with the gather table on the device.
struct CudaConvPlan {
  int64_t count = 0;
  DeviceBuffer offsets;
};

struct PerforatedConvKernel {
  PerforatedConvKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api), input_index_(info, 4) {
    KernelAttributes attrs(api, info);
    node_ = attrs.NodeName();
    attrs_ = ReadConvAttributes(attrs);
    constant_mask_ = ReadConstantInput(info, 3, [](const Ort::ConstValue& v) {
      return std::make_shared<const MaskInput>(ReadMaskInput(v));
    });
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return Guarded(api_, "PerforatedConv", node_, [&] { Compute(context); });
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const PerforatedConvInputs in = GetPerforatedConvInputs(ctx);
    // A compact X (X_index given) is read through gather offsets into its K_in-long planes: the
    // kernels only use H * W as the plane stride, so they get H = 1, W = K_in.
    auto input_index = in.x_index ? input_index_.Read(in.x_index, in.x_shape) : nullptr;
    const bool compact = input_index != nullptr;
    const ConvShape s = ComputeConvShape(in.x_shape, in.w_shape, in.b ? &in.b_shape : nullptr, attrs_,
                                         input_index.get());
    const cudaStream_t stream = ComputeStream(ctx);
    // A mask that is not an initializer is read each call (a few KiB in CPU memory) and compared with
    // the cached plan's, so that an unchanged mask costs no upload.
    auto mask = constant_mask_ ? constant_mask_ : std::make_shared<const MaskInput>(ReadMaskInput(in.mask));
    const auto plan = plans_.Get(MakePlanKey(s, std::move(mask), std::move(input_index), CurrentDevice()),
                                 [&](const PlanKey& key) {
      auto plan = std::make_shared<CudaConvPlan>();
      const MaskPositions positions = ComputeMaskPositions(key.mask->values.data(), key.mask->shape, s.out_h, s.out_w);
      plan->count = positions.count();
      const GatherTable table = BuildGatherTable(s, attrs_, positions, key.input_index.get());
      plan->offsets.Upload(table.offsets.data(), table.offsets.size() * sizeof(int32_t), stream);
      return plan;
    });
    auto y = ctx.GetOutput(0, {s.batch, s.out_channels, plan->count});
    if (s.batch == 0 || s.out_channels == 0) return;
    Check(onnx_perforate_cuda_perforated_conv(
              in.x.GetTensorData<float>(), in.w.GetTensorData<float>(), in.b ? in.b.GetTensorData<float>() : nullptr,
              plan->offsets.get<int32_t>(), ToInt(s.batch, "N"), ToInt(s.in_channels, "C"),
              ToInt(compact ? 1 : s.in_h, "H"), ToInt(compact ? s.in_plane : s.in_w, "W"), ToInt(s.out_channels, "M"),
              ToInt(s.group, "group"), ToInt(s.kernel_h, "kH"), ToInt(s.kernel_w, "kW"), ToInt(plan->count, "K"),
              static_cast<int>(attrs_.activation), attrs_.alpha, attrs_.clip_min, attrs_.clip_max,
              y.GetTensorMutableData<float>(), stream),
          "PerforatedConv CUDA launch");
  }

  const OrtApi& api_;
  std::string node_;
  ConvAttributes attrs_;
  std::shared_ptr<const MaskInput> constant_mask_;
  InputIndexReader input_index_;
  PlanCache<CudaConvPlan> plans_;
};

// The index's device copy, for one device.
struct CudaIndexPlan {
  std::shared_ptr<const InterpolationIndex> index;
  int device = -1;
  DeviceBuffer values;
};

struct NNInterpolateKernel : NNInterpolateKernelBase<NNInterpolateKernel> {
  using NNInterpolateKernelBase::NNInterpolateKernelBase;

  void Interpolate(const Ort::KernelContext& ctx, const std::shared_ptr<const InterpolationIndex>& index,
                   const float* yc, float* y, int64_t planes, int64_t count) {
    const cudaStream_t stream = ComputeStream(ctx);
    const auto plan = DevicePlan(index, stream);
    Check(onnx_perforate_cuda_nn_interpolate(yc, plan->values.get<int32_t>(), planes, ToInt(count, "K"),
                                             ToInt(index->positions(), "Ho*Wo"), y, stream),
          "NNInterpolate CUDA launch");
  }

  // Uploaded once per index object and device: the base hands back the same object while the index
  // values are unchanged (see NNInterpolateKernelBase), so the address identifies the values.
  std::shared_ptr<const CudaIndexPlan> DevicePlan(const std::shared_ptr<const InterpolationIndex>& index,
                                                  cudaStream_t stream) {
    const int device = CurrentDevice();
    std::lock_guard<std::mutex> lock(mutex_);
    if (plan_ && plan_->index == index && plan_->device == device) return plan_;
    auto plan = std::make_shared<CudaIndexPlan>();
    plan->index = index;
    plan->device = device;
    plan->values.Upload(index->values.data(), index->values.size() * sizeof(int32_t), stream);
    plan_ = std::move(plan);
    return plan_;
  }

  std::mutex mutex_;
  std::shared_ptr<const CudaIndexPlan> plan_;
};

// CompactPool's window table on the device (pool_geometry.h), for one compact input size.
struct CudaPoolPlan {
  std::shared_ptr<const PoolTable> table;
  int device = -1;
  DeviceBuffer begin, entries, weights;
};

struct CompactPoolKernel : CompactPoolKernelBase<CompactPoolKernel> {
  using CompactPoolKernelBase::CompactPoolKernelBase;

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const CompactPoolInputs in = GetCompactPoolInputs(ctx);
    const cudaStream_t stream = ComputeStream(ctx);
    const auto plan = Plan(in, stream);
    const PoolTable& t = *plan->table;
    auto y = ctx.GetOutput(0, CompactPoolOutputShape(t, in));
    const int64_t planes = in.x_shape[0] * in.x_shape[1];
    if (planes == 0 || t.count == 0) return;
    Check(onnx_perforate_cuda_compact_pool(in.x.GetTensorData<float>(), plan->begin.get<int32_t>(),
                                           plan->entries.get<int32_t>(), plan->weights.get<float>(),
                                           attrs_.mode == PoolMode::kMax ? ONNX_PERFORATE_POOL_MAX : ONNX_PERFORATE_POOL_AVERAGE,
                                           planes, ToInt(t.compact_size, "K_in"), ToInt(t.count, "outputs"),
                                           y.GetTensorMutableData<float>(), stream),
          "CompactPool CUDA launch");
  }

  // Uploaded once per compact input size and device when X_index and Y_positions are initializers.
  std::shared_ptr<const CudaPoolPlan> Plan(const CompactPoolInputs& in, cudaStream_t stream) {
    const int device = CurrentDevice();
    std::lock_guard<std::mutex> lock(mutex_);
    if (constant_tables_ && plan_ && plan_->device == device && in.x_shape.size() == 3 &&
        plan_->table->compact_size == in.x_shape[2])
      return plan_;
    auto plan = std::make_shared<CudaPoolPlan>();
    plan->table = ReadPoolTable(attrs_, in);
    plan->device = device;
    const PoolTable& t = *plan->table;
    plan->begin.Upload(t.begin.data(), t.begin.size() * sizeof(int32_t), stream);
    plan->entries.Upload(t.entries.data(), t.entries.size() * sizeof(int32_t), stream);
    if (!t.weights.empty()) plan->weights.Upload(t.weights.data(), t.weights.size() * sizeof(float), stream);
    plan_ = std::move(plan);
    return plan_;
  }

  std::shared_ptr<const CudaPoolPlan> plan_;
};

// The data path stays on the GPU; the mask and the index are read in CPU memory to build the tables.
struct PerforatedConvCudaOp : PerforatedConvOpBase<PerforatedConvCudaOp, PerforatedConvKernel, 5> {
  const char* GetExecutionProviderType() const { return kProvider; }
  OrtMemType GetInputMemoryType(size_t i) const { return i >= 3 ? OrtMemTypeCPUInput : OrtMemTypeDefault; }
};

struct NNInterpolateCudaOp : NNInterpolateOpBase<NNInterpolateCudaOp, NNInterpolateKernel> {
  const char* GetExecutionProviderType() const { return kProvider; }
  OrtMemType GetInputMemoryType(size_t i) const { return i == 1 ? OrtMemTypeCPUInput : OrtMemTypeDefault; }
};

struct CompactPoolCudaOp : CompactPoolOpBase<CompactPoolCudaOp, CompactPoolKernel> {
  const char* GetExecutionProviderType() const { return kProvider; }
  OrtMemType GetInputMemoryType(size_t i) const { return i >= 1 ? OrtMemTypeCPUInput : OrtMemTypeDefault; }
};

}  // namespace

void AddCudaOps(Ort::CustomOpDomain& domain) {
  static PerforatedConvCudaOp perforated_conv;
  static NNInterpolateCudaOp nn_interpolate;
  static CompactPoolCudaOp compact_pool;
  domain.Add(&perforated_conv);
  domain.Add(&nn_interpolate);
  domain.Add(&compact_pool);
  AddQuantizedCudaRefusal(domain);  // INT8: no CUDA kernel, a clear error instead of a silent CPU fallback
}

}  // namespace onnx_perforate
