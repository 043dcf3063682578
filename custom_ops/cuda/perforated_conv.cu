// CUDA kernels of PerforatedConv (float32).
//
// General case: an implicit GEMM per group,
//     Yc_g[m, (n, k)] = sum_r W_g[m, r] * B[r, (n, k)],   r = c * taps + tap (W's own layout),
//     B[r, (n, k)] = X[n, g*cg + c, offsets[tap*K + k]]    (0 where the offset is -1 = padding),
// with the batch folded into the column dimension so that batch-1 layers with few computed positions
// still fill the tiles. Each block computes a BM x BN output tile: it loads the W tile (coalesced along
// r) and gathers the B tile straight from X through the gather table into shared memory, so no im2col
// buffer is ever written. The K-tile's gather offsets are loaded into shared memory once per block.
// Register blocking TM x TN per thread, double-buffered shared tiles with register prefetch: one
// __syncthreads per reduction step. Arithmetic is plain FP32 FMA (no TF32, no tensor cores).
//
// Depthwise convolutions, and groups with few outputs and few inputs, where a GEMM tile would be mostly
// empty, use a direct kernel instead: one thread per computed position and CPT output channels. Which
// kernel and tiles run is decided on the host by ChooseConvLaunch (launch_plan.h).
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "kernels.h"
#include "launch_plan.h"

namespace {

struct ConvParams {
  const float* x;
  const float* w;
  const float* b;
  const int32_t* offsets;
  float* yc;
  long long cols;          // N * K
  long long image_stride;  // C * H * W
  int C, HW, M, K;
  int cg, mg, taps, R;  // channels per group in / out, kernel taps, reduction length cg * taps
  int activation;
  float alpha, clip_min, clip_max;
  int k_tiles_per_split, splits;
  bool vector_store;  // K % 4 == 0 and yc 16-byte aligned: float4 stores in the epilogue
};

// Same formulas (and NaN behaviour) as the CPU kernel's std::max / std::min.
__device__ __forceinline__ float Activate(float v, int act, float alpha, float lo, float hi) {
  switch (act) {
    case ONNX_PERFORATE_ACTIVATION_RELU:
      return v < 0.0f ? 0.0f : v;
    case ONNX_PERFORATE_ACTIVATION_LEAKY_RELU:
      return v < 0.0f ? alpha * v : v;
    case ONNX_PERFORATE_ACTIVATION_CLIP: {
      const float t = v < lo ? lo : v;
      return hi < t ? hi : t;
    }
    default:
      return v;
  }
}

// Gather offsets of a block's columns are kept in shared memory when taps * BN fits in this many
// entries (16 KiB: 32 taps with 128-column tiles, 64 with 64-column tiles); larger kernels read the table
// from global memory, where it stays in L1/L2. Keeps the static shared memory under 48 KiB.
constexpr int kSmemOffsets = 4096;

template <int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    PerforatedConvGemm(const ConvParams p) {
  constexpr int TX = BN / TN, TY = BM / TM, T = TX * TY;
  constexpr int NG = TN / 4;             // float4 column groups per thread
  constexpr int A_PER = BM * BK / T;     // W elements each thread loads per tile
  constexpr int B_ROWS = BK * BN / T;    // gathered rows each thread loads per tile (one column)
  static_assert(TM == 4 && TN % 4 == 0, "the inner loop reads float4 fragments");
  static_assert(T % BK == 0 && T % BN == 0 && (BM * BK) % T == 0 && (BK * BN) % T == 0, "tile shape");

  // +4: transposed W stores hit fewer banks, rows stay 16-byte aligned for the float4 reads.
  __shared__ __align__(16) float As[2][BK][BM + 4];
  __shared__ __align__(16) float Bs[2][BK][BN];
  __shared__ int32_t s_off[kSmemOffsets];

  const int tid = threadIdx.x;
  const int tx = tid % TX, ty = tid / TX;
  const int split = blockIdx.z % p.splits, g = blockIdx.z / p.splits;
  const int m0 = blockIdx.y * BM;
  const long long col0 = static_cast<long long>(blockIdx.x) * BN;

  // --- this thread's column of the gathered tile: one (n, k) for the whole reduction -----------------
  const int bcol = tid % BN, brow0 = (tid / BN) * B_ROWS;
  const long long bj = col0 + bcol;
  const bool bvalid = bj < p.cols;
  const long long bn = bvalid ? bj / p.K : 0;
  const int bk = bvalid ? static_cast<int>(bj - bn * p.K) : 0;
  const float* xg = p.x + bn * p.image_stride + static_cast<long long>(g) * p.cg * p.HW;

  const int32_t* offp;
  int ostride;
  const bool smem_offsets = p.taps * BN <= kSmemOffsets;
  if (smem_offsets) {
    for (int i = tid; i < p.taps * BN; i += T) {
      const int tap = i / BN;
      const long long j = col0 + (i - tap * BN);
      s_off[i] = j < p.cols ? __ldg(p.offsets + static_cast<long long>(tap) * p.K + j % p.K) : -1;
    }
    offp = s_off + bcol;
    ostride = BN;
  } else {
    offp = p.offsets + bk;
    ostride = p.K;
  }

  // --- reduction range of this split ------------------------------------------------------------------
  const int k_tiles = (p.R + BK - 1) / BK;
  const int kt_begin = split * p.k_tiles_per_split;
  const int kt_end = min(kt_begin + p.k_tiles_per_split, k_tiles);

  // (c, tap) of this thread's first gathered row, advanced by BK rows per tile without divisions.
  const int step_c = BK / p.taps, step_tap = BK % p.taps;
  int cur_c, cur_tap;
  {
    const int r = kt_begin * BK + brow0;
    cur_c = r / p.taps;
    cur_tap = r - cur_c * p.taps;
  }

  // W tile: thread loads rows m0 + tid / BK + i * (T / BK), column tid % BK (16 threads = one 64-byte run).
  const int a_r = tid % BK, a_m = tid / BK;
  const float* wg = p.w + static_cast<long long>(g) * p.mg * p.R;

  float a_reg[A_PER], b_reg[B_ROWS];

  auto load_tiles = [&](int kt) {
    const int r = kt * BK + a_r;
#pragma unroll
    for (int i = 0; i < A_PER; ++i) {
      const int m = m0 + a_m + i * (T / BK);
      a_reg[i] = (m < p.mg && r < p.R) ? __ldg(wg + static_cast<long long>(m) * p.R + r) : 0.0f;
    }
    int c = cur_c, tap = cur_tap;
#pragma unroll
    for (int i = 0; i < B_ROWS; ++i) {
      float v = 0.0f;
      if (bvalid && c < p.cg) {  // c < cg <=> row < R
        const int o = offp[static_cast<long long>(tap) * ostride];
        if (o >= 0) v = __ldg(xg + static_cast<long long>(c) * p.HW + o);
      }
      b_reg[i] = v;
      if (++tap == p.taps) {
        tap = 0;
        ++c;
      }
    }
  };
  auto store_tiles = [&](int buf) {
#pragma unroll
    for (int i = 0; i < A_PER; ++i) As[buf][a_r][a_m + i * (T / BK)] = a_reg[i];
#pragma unroll
    for (int i = 0; i < B_ROWS; ++i) Bs[buf][brow0 + i][bcol] = b_reg[i];
  };
  auto advance = [&] {
    cur_tap += step_tap;
    cur_c += step_c;
    if (cur_tap >= p.taps) {
      cur_tap -= p.taps;
      ++cur_c;
    }
  };

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  if (smem_offsets) __syncthreads();  // s_off is read by load_tiles
  if (kt_begin < kt_end) {
    load_tiles(kt_begin);
    store_tiles(0);
  }
  __syncthreads();

  int buf = 0;
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const bool more = kt + 1 < kt_end;
    if (more) {  // issue the next tile's global loads before the math to hide their latency
      advance();
      load_tiles(kt + 1);
    }
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      const float4 a4 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * TM]);
      const float a[TM] = {a4.x, a4.y, a4.z, a4.w};
      float bv[TN];
#pragma unroll
      for (int q = 0; q < NG; ++q) {
        const float4 b4 = *reinterpret_cast<const float4*>(&Bs[buf][kk][q * TX * 4 + tx * 4]);
        bv[q * 4 + 0] = b4.x;
        bv[q * 4 + 1] = b4.y;
        bv[q * 4 + 2] = b4.z;
        bv[q * 4 + 3] = b4.w;
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
    }
    if (more) store_tiles(buf ^ 1);
    __syncthreads();  // the other buffer is complete and nobody reads this one any more
    buf ^= 1;
  }

  // --- epilogue: bias + activation (or raw partial sums when the reduction is split) -------------------
  const bool partial = p.splits > 1;
#pragma unroll
  for (int q = 0; q < NG; ++q) {
    const long long j0 = col0 + q * TX * 4 + tx * 4;  // 4 consecutive columns, j0 % 4 == 0
    if (j0 >= p.cols) continue;
    if (p.vector_store && !partial) {
      // K % 4 == 0: the 4 columns are in the same image and 16-byte aligned.
      const long long n = j0 / p.K;
      const int k = static_cast<int>(j0 - n * p.K);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int m = m0 + ty * TM + i;
        if (m >= p.mg) continue;
        const int gm = g * p.mg + m;
        const float bias = p.b ? __ldg(p.b + gm) : 0.0f;
        float4 v;
        v.x = Activate(acc[i][q * 4 + 0] + bias, p.activation, p.alpha, p.clip_min, p.clip_max);
        v.y = Activate(acc[i][q * 4 + 1] + bias, p.activation, p.alpha, p.clip_min, p.clip_max);
        v.z = Activate(acc[i][q * 4 + 2] + bias, p.activation, p.alpha, p.clip_min, p.clip_max);
        v.w = Activate(acc[i][q * 4 + 3] + bias, p.activation, p.alpha, p.clip_min, p.clip_max);
        *reinterpret_cast<float4*>(p.yc + (n * p.M + gm) * p.K + k) = v;
      }
      continue;
    }
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const long long j = j0 + jj;
      if (j >= p.cols) break;
      const long long n = j / p.K;
      const int k = static_cast<int>(j - n * p.K);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int m = m0 + ty * TM + i;
        if (m >= p.mg) continue;
        const int gm = g * p.mg + m;
        float* out = p.yc + (n * p.M + gm) * p.K + k;
        if (partial) {
          atomicAdd(out, acc[i][q * 4 + jj]);
        } else {
          const float bias = p.b ? __ldg(p.b + gm) : 0.0f;
          *out = Activate(acc[i][q * 4 + jj] + bias, p.activation, p.alpha, p.clip_min, p.clip_max);
        }
      }
    }
  }
}

// Bias + activation after a split reduction has summed into yc.
__global__ void BiasActivationKernel(const ConvParams p, long long total) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int m = static_cast<int>((i / p.K) % p.M);
    const float bias = p.b ? __ldg(p.b + m) : 0.0f;
    p.yc[i] = Activate(p.yc[i] + bias, p.activation, p.alpha, p.clip_min, p.clip_max);
  }
}

// Direct kernel: thread = one computed position k of one image, CPT consecutive output channels.
// The gather offset of each tap is read once (coalesced along k) and reused for all CPT channels.
constexpr int kDirectThreads = 128;
constexpr int kDirectChannels = 4;

__global__ void __launch_bounds__(kDirectThreads) PerforatedConvDirect(const ConvParams p, int batch) {
  const int k = blockIdx.x * kDirectThreads + threadIdx.x;
  if (k >= p.K) return;
  const int m_begin = blockIdx.y * kDirectChannels;
  for (int n = blockIdx.z; n < batch; n += gridDim.z) {
    const float* xn = p.x + static_cast<long long>(n) * p.image_stride;
    float acc[kDirectChannels];
#pragma unroll
    for (int ci = 0; ci < kDirectChannels; ++ci) acc[ci] = 0.0f;
    for (int tap = 0; tap < p.taps; ++tap) {
      const int o = __ldg(p.offsets + static_cast<long long>(tap) * p.K + k);
      if (o < 0) continue;
#pragma unroll
      for (int ci = 0; ci < kDirectChannels; ++ci) {
        const int m = m_begin + ci;
        if (m >= p.M) break;
        const int g = m / p.mg;
        const float* xc = xn + static_cast<long long>(g) * p.cg * p.HW + o;
        const float* wm = p.w + static_cast<long long>(m) * p.R + tap;
        for (int c = 0; c < p.cg; ++c)
          acc[ci] = fmaf(__ldg(wm + c * p.taps), __ldg(xc + static_cast<long long>(c) * p.HW), acc[ci]);
      }
    }
#pragma unroll
    for (int ci = 0; ci < kDirectChannels; ++ci) {
      const int m = m_begin + ci;
      if (m >= p.M) break;
      const float bias = p.b ? __ldg(p.b + m) : 0.0f;
      p.yc[(static_cast<long long>(n) * p.M + m) * p.K + k] =
          Activate(acc[ci] + bias, p.activation, p.alpha, p.clip_min, p.clip_max);
    }
  }
}

// Per-device values read once (devices are numbered densely; more than 64 fall back to a guess).
template <typename Query>
int CachedPerDevice(std::atomic<int> (&cache)[64], int fallback, Query&& query) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return fallback;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v > 0) return v;
  v = query(device);
  if (v <= 0) v = fallback;
  cache[device].store(v, std::memory_order_relaxed);
  return v;
}

int SmCount() {
  static std::atomic<int> cache[64];
  return CachedPerDevice(cache, 108, [](int device) {
    int v = 0;
    return cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) == cudaSuccess ? v : 0;
  });
}

using onnx_perforate::ChooseConvLaunch;
using onnx_perforate::ConvKernel;
using onnx_perforate::ConvLaunch;
using onnx_perforate::kBigTileK;
using onnx_perforate::kBigTileM;
using onnx_perforate::kBigTileN;
using onnx_perforate::kBigTileThreads;
using onnx_perforate::kSmallTileK;
using onnx_perforate::kSmallTileM;
using onnx_perforate::kSmallTileN;
using onnx_perforate::kSmallTileThreads;

constexpr auto BigTileKernel = PerforatedConvGemm<kBigTileM, kBigTileN, kBigTileK, 4, 8>;
constexpr auto SmallTileKernel = PerforatedConvGemm<kSmallTileM, kSmallTileN, kSmallTileK, 4, 4>;

// Big-tile blocks resident per SM at once (registers and shared memory decide; 2 on sm_90).
int BigBlocksPerSm() {
  static std::atomic<int> cache[64];
  return CachedPerDevice(cache, 2, [](int) {
    int v = 0;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, BigTileKernel, kBigTileThreads, 0) == cudaSuccess ? v : 0;
  });
}

bool Deterministic() {
  static const bool value = [] {
    const char* s = std::getenv("ONNX_PERFORATE_CUDA_DETERMINISTIC");
    return s && *s && *s != '0';
  }();
  return value;
}

long long CeilDiv(long long a, long long b) { return (a + b - 1) / b; }

}  // namespace

extern "C" cudaError_t onnx_perforate_cuda_device_conv_config(int* sms, int* big_blocks_per_sm) {
  if (!sms || !big_blocks_per_sm) return cudaErrorInvalidValue;
  int device = 0;
  const cudaError_t e = cudaGetDevice(&device);  // fails without a usable device, rather than guessing
  if (e != cudaSuccess) return e;
  *sms = SmCount();
  *big_blocks_per_sm = BigBlocksPerSm();
  return cudaSuccess;
}

extern "C" cudaError_t onnx_perforate_cuda_perforated_conv(const float* x, const float* w, const float* b,
                                                         const int32_t* gather_offsets, int N, int C, int H,
                                                         int W, int M, int group, int kh, int kw, int K,
                                                         int activation, float alpha, float clip_min,
                                                         float clip_max, float* yc, cudaStream_t stream) {
  if (N < 0 || C < 0 || H < 0 || W < 0 || M < 0 || K < 0 || kh < 1 || kw < 1 || group < 1 || C % group ||
      M % group || activation < 0 || activation > ONNX_PERFORATE_ACTIVATION_CLIP)
    return cudaErrorInvalidValue;
  if (N == 0 || M == 0 || K == 0) return cudaSuccess;
  // ONNX Runtime passes NULL data for zero-element tensors: X is empty when C == 0 or H * W == 0 (all
  // taps then read padding), W when C == 0. Those pointers are never dereferenced.
  const bool x_empty = C == 0 || static_cast<long long>(H) * W == 0;
  if ((!x && !x_empty) || (!w && C != 0) || !gather_offsets || !yc) return cudaErrorInvalidValue;

  ConvParams p{};
  p.x = x;
  p.w = w;
  p.b = b;
  p.offsets = gather_offsets;
  p.yc = yc;
  p.C = C;
  p.HW = H * W;
  p.M = M;
  p.K = K;
  p.cg = C / group;
  p.mg = M / group;
  p.taps = kh * kw;
  p.R = p.cg * p.taps;
  p.cols = static_cast<long long>(N) * K;
  p.image_stride = static_cast<long long>(C) * H * W;
  p.activation = activation;
  p.alpha = alpha;
  p.clip_min = clip_min;
  p.clip_max = clip_max;
  p.splits = 1;
  p.vector_store = K % 4 == 0 && (reinterpret_cast<uintptr_t>(yc) & 15) == 0;

  const int sms = SmCount();
  const ConvLaunch launch = ChooseConvLaunch(N, C, M, group, p.taps, K, sms,
                                             BigBlocksPerSm(), Deterministic());
  const long long total = p.cols * M;
  if (launch.kernel == ConvKernel::kBiasOnly) {
    const cudaError_t e = cudaMemsetAsync(yc, 0, total * sizeof(float), stream);
    if (e != cudaSuccess) return e;
    BiasActivationKernel<<<static_cast<unsigned>(CeilDiv(total, 256) < 4096 ? CeilDiv(total, 256) : 4096), 256, 0,
                           stream>>>(p, total);
    return cudaGetLastError();
  }
  if (launch.kernel == ConvKernel::kDirect) {
    const dim3 grid(static_cast<unsigned>(CeilDiv(K, kDirectThreads)),
                    static_cast<unsigned>(CeilDiv(M, kDirectChannels)), static_cast<unsigned>(N < 65535 ? N : 65535));
    if (grid.y > 65535) return cudaErrorInvalidConfiguration;
    PerforatedConvDirect<<<grid, kDirectThreads, 0, stream>>>(p, N);
    return cudaGetLastError();
  }

  const bool big = launch.kernel == ConvKernel::kBigTiles;
  const int bm = big ? kBigTileM : kSmallTileM, bn = big ? kBigTileN : kSmallTileN;
  p.k_tiles_per_split = launch.k_tiles_per_split;
  p.splits = launch.splits;
  const dim3 grid(static_cast<unsigned>(CeilDiv(p.cols, bn)), static_cast<unsigned>(CeilDiv(p.mg, bm)),
                  static_cast<unsigned>(static_cast<long long>(group) * p.splits));
  if (CeilDiv(p.cols, bn) > 0x7fffffffLL || grid.y > 65535 || static_cast<long long>(group) * p.splits > 65535)
    return cudaErrorInvalidConfiguration;

  if (p.splits > 1) {
    const cudaError_t e = cudaMemsetAsync(yc, 0, total * sizeof(float), stream);
    if (e != cudaSuccess) return e;
  }
  if (big)
    BigTileKernel<<<grid, kBigTileThreads, 0, stream>>>(p);
  else
    SmallTileKernel<<<grid, kSmallTileThreads, 0, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || p.splits == 1) return e;
  const long long epilogue_blocks = CeilDiv(total, 256) < 4 * sms ? CeilDiv(total, 256) : 4 * sms;
  BiasActivationKernel<<<static_cast<unsigned>(epilogue_blocks), 256, 0, stream>>>(p, total);
  return cudaGetLastError();
}
