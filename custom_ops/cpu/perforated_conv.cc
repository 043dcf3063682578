#include "perforated_conv.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <vector>

#include <unistd.h>

#include "blas.h"

namespace onnx_perforate {

namespace {

// Compiled for several ISAs and picked at load time: the library must run on any x86-64 CPU.
#define PERFORATE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

// One im2col row: dst[k] = plane[offsets[k]], 0 where the offset marks padding (-1). The clamped load
// keeps the loop branch-free and vectorisable (masked gathers).
PERFORATE_MULTIVERSION
void GatherRow(const float* __restrict plane, const int32_t* __restrict offsets, int64_t n,
               float* __restrict dst) {
  for (int64_t k = 0; k < n; ++k) {
    const int32_t o = offsets[k];
    const float v = plane[o < 0 ? 0 : o];
    dst[k] = o < 0 ? 0.0f : v;
  }
}

// Same, accumulating w * pixel: the depthwise path, where a GEMM of one row would waste the BLAS call.
PERFORATE_MULTIVERSION
void GatherRowAxpy(const float* __restrict plane, const int32_t* __restrict offsets, int64_t n, float w,
                   float* __restrict acc) {
  for (int64_t k = 0; k < n; ++k) {
    const int32_t o = offsets[k];
    const float v = plane[o < 0 ? 0 : o];
    acc[k] += o < 0 ? 0.0f : w * v;
  }
}

PERFORATE_MULTIVERSION
void BiasActivation(float* __restrict y, int64_t n, float bias, Activation act, float alpha, float lo,
                    float hi) {
  switch (act) {
    case Activation::kNone:
      for (int64_t k = 0; k < n; ++k) y[k] += bias;
      break;
    case Activation::kRelu:
      for (int64_t k = 0; k < n; ++k) y[k] = std::max(y[k] + bias, 0.0f);
      break;
    case Activation::kLeakyRelu:
      for (int64_t k = 0; k < n; ++k) {
        const float v = y[k] + bias;
        y[k] = v < 0.0f ? alpha * v : v;
      }
      break;
    case Activation::kClip:
      for (int64_t k = 0; k < n; ++k) y[k] = std::min(std::max(y[k] + bias, lo), hi);
      break;
  }
}

// Columns (computed positions) per task, a multiple of `unit`. One block per core keeps every core
// busy when N * group is small; more blocks than that only cost bandwidth, since every block streams
// all the weights through the cache again. The bounds keep a task's buffers in L2.
int64_t ColumnBlock(int64_t count, int64_t outer_tasks, int64_t unit, int64_t min_block, int64_t max_block) {
  // As many blocks as needed to respect max_block, and a multiple of the cores so they end together.
  const int64_t cores = Cores();
  int64_t blocks = std::max<int64_t>((count + max_block - 1) / max_block, (cores + outer_tasks - 1) / outer_tasks);
  blocks = (blocks * outer_tasks + cores - 1) / cores * cores / outer_tasks;
  int64_t block = (count + std::max<int64_t>(blocks, 1) - 1) / std::max<int64_t>(blocks, 1);
  block = std::max(block, min_block);
  block = (block + unit - 1) / unit * unit;
  return std::min(block, (count + unit - 1) / unit * unit);
}

// Per-thread scratch, reused across calls: tasks of ORT's pool never share it.
thread_local std::vector<float> tls_panel;
thread_local std::vector<float> tls_tile;
thread_local std::vector<float> tls_padded;
thread_local std::vector<const float*> tls_rows;
thread_local std::vector<int32_t> tls_positions;

// Reduction depth of one pass: the MR x KC weight panels (up to 64 KiB each) stay in L2 while the
// input pixels of one tile of positions stay in L1 across all of them. The patch is cut into equal
// passes of at most kMaxKc (a short last pass would pay a tile's fixed costs for little work): 512
// rather than 256 measured 2-3% faster on the 3x3 layers of bench_kernels (fewer accumulator
// round trips through the tile buffer).
constexpr int64_t kMaxKc = 512;

int64_t PassDepth(int64_t patch) {
  const int64_t passes = (patch + kMaxKc - 1) / kMaxKc;
  return (patch + passes - 1) / passes;
}

// Bytes of weight panels one KC pass may stream and still expect to find in L2 on its next tile: half
// of this CPU's L2 (1 MiB on Zen 5 and recent Xeons, 512 KiB on Zen 1-3; 512 KiB where not reported).
int64_t L2Share() {
  static const int64_t share = [] {
    const long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return (bytes > 0 ? static_cast<int64_t>(bytes) : int64_t{512} << 10) / 2;
  }();
  return share;
}

// Rows of one plane no wider than a vector once padded (wp <= 16: 13x13 and 7x7 maps), with their left
// and right padding: one masked load and store per row. On such planes a memmove call and two fills per
// row cost four times as much (192 x 13 x 13: 10 against 2.5 us, 3% of a perforated layer at r = 0.75);
// on wider rows memmove is the faster copy.
__attribute__((target("avx512f"))) void PadNarrowRows(const float* __restrict src, int64_t rows, int64_t w,
                                                      int64_t pad_left, int64_t wp, float* __restrict dst) {
  const __mmask16 stored = static_cast<__mmask16>((1u << wp) - 1);
  const __mmask16 loaded = static_cast<__mmask16>(((1u << (pad_left + w)) - 1) & ~((1u << pad_left) - 1));
  // src + y * w - pad_left may point before the plane: the masked-off lanes are never read.
  for (int64_t y = 0; y < rows; ++y)
    _mm512_mask_storeu_ps(dst + y * wp, stored, _mm512_maskz_loadu_ps(loaded, src + y * w - pad_left));
}

// rows[g * patch + p]: where row p = (channel, tap) of group g's im2col matrix starts in `input`.
void RowStarts(const ConvShape& s, const PaddedGather& padded, const float* input, const float** rows) {
  for (int64_t channel = 0; channel < s.in_channels; ++channel)
    for (int64_t tap = 0; tap < s.taps(); ++tap)
      rows[channel * s.taps() + tap] = input + channel * padded.plane + padded.tap_offsets[tap];
}

// Rows [y0, y1) of one plane of X with the convolution's padding made explicit: zero rows above and
// below X's, X's rows with their left and right padding between (a compact X through its index, scalar).
void PadPlaneRows(const ConvShape& s, const ConvAttributes& a, const PaddedGather& g, const InputIndex* index,
                  const float* src, float* dst, int64_t y0, int64_t y1) {
  const int64_t wp = g.padded_w, top = a.pad_top;
  const int64_t first = std::max(y0, top), last = std::min(y1, top + s.in_h);  // rows holding X's rows
  if (first >= last) return std::fill(dst + y0 * wp, dst + y1 * wp, 0.0f);
  std::fill(dst + y0 * wp, dst + first * wp, 0.0f);
  std::fill(dst + last * wp, dst + y1 * wp, 0.0f);
  if (!index && wp <= 16 && BestGemmIsa().width == 16)  // AVX-512 (not when avx2 is forced)
    return PadNarrowRows(src + (first - top) * s.in_w, last - first, s.in_w, a.pad_left, wp, dst + first * wp);
  for (int64_t y = first - top; y < last - top; ++y) {
    float* row = dst + (top + y) * wp;
    std::fill(row, row + a.pad_left, 0.0f);
    if (index) {
      const int32_t* positions = index->values.data() + y * s.in_w;
      for (int64_t xx = 0; xx < s.in_w; ++xx) row[a.pad_left + xx] = src[positions[xx]];
    } else {
      std::copy(src + y * s.in_w, src + (y + 1) * s.in_w, row + a.pad_left);
    }
    std::fill(row + a.pad_left + s.in_w, row + wp, 0.0f);
  }
}

// X with the convolution's padding made explicit, one plane per task. A compact X is interpolated on
// the way (through its index): the full input exists only in this per-thread scratch buffer.
void PadInput(const ConvShape& s, const ConvAttributes& a, const PaddedGather& g, const InputIndex* index,
              const float* x, float* out, const ParallelRunner& parallel) {
  const int64_t hp = g.padded_h, wp = g.padded_w;
  if (g.sources_plan) {  // compact X: every plane through the permute plan of its padded pixels' sources
    NNInterpolateCpu::Compute(s.batch * s.in_channels, index->compact_size, g.sources.data(), hp * wp, x, out, parallel,
                              g.sources_plan.get());
    return;
  }
  RunMaybeSerially(parallel, s.batch * s.in_channels * hp * wp, static_cast<size_t>(s.batch * s.in_channels),
                   [&](size_t plane) { PadPlaneRows(s, a, g, index, x + plane * s.in_plane, out + plane * hp * wp, 0, hp); });
}

// The padded copy made by the GEMM's tasks themselves, each thread copying the rows its tasks read into
// a buffer of its own, instead of one copy of the whole input before them: the tasks then read rows
// their own thread has just written (the micro-kernel's scattered loads found the other core's rows
// slow), and a copy large enough to run in parallel no longer wakes the pool once more. The copy's share
// of a perforated 3x3 layer at r = 0.75 on two threads (against the same layer on an input padded
// beforehand), whole copy -> bands: 128 x 56 x 56 5.0% -> 3.4%, 256 x 28 x 28 7.1% -> 4.7%, 192 x 13 x 13
// 3.9% -> 2.4% (docs/benchmarks.md). Compact inputs with a permute plan keep the whole copy: the plan
// covers whole planes.
struct BandCopy {
  uint64_t call = 0;                // the GEMM call whose rows the buffer holds (0: none)
  int64_t first_image = 0;          // the micro-batch chunk the row pointers were made for
  int64_t lo = 0, hi = 0;           // rows [lo, hi) are copied, counted as image * padded_h + row
  std::vector<float> buffer;        // laid out as the whole padded input, only [lo, hi) valid
  std::vector<const float*> rows;   // RowStarts over the buffer
};
thread_local BandCopy tls_band;
std::atomic<uint64_t> band_calls{0};

// Band copies are used up to this size of the padded input (per thread: every thread may hold one).
constexpr int64_t kMaxBandCopyFloats = int64_t{2} << 20;  // 8 MiB

// Copies rows [a, b) (image * padded_h + row, every channel) of the padded input into the buffer.
void CopyRows(const ConvShape& s, const ConvAttributes& a, const PaddedGather& g, const InputIndex* index,
              const float* x, float* buffer, int64_t lo, int64_t hi) {
  const int64_t hp = g.padded_h;
  for (int64_t n = lo / hp; n * hp < hi; ++n) {
    const int64_t y0 = std::max(lo - n * hp, int64_t{0}), y1 = std::min(hi - n * hp, hp);
    for (int64_t c = 0; c < s.in_channels; ++c) {
      const int64_t plane = n * s.in_channels + c;
      PadPlaneRows(s, a, g, index, x + plane * s.in_plane, buffer + plane * g.plane, y0, y1);
    }
  }
}

// This thread's row pointers for columns [k0, k0 + kn) of the micro-batch chunk starting at image n0,
// after copying the rows they read that its buffer does not hold yet.
const float* const* BandRows(const ConvShape& s, const ConvAttributes& a, const PaddedGather& g,
                             const InputIndex* index, const float* x, uint64_t call, int64_t n0, int64_t count,
                             int64_t k0, int64_t kn) {
  BandCopy& band = tls_band;
  const int64_t hp = g.padded_h, wp = g.padded_w;
  float* buffer = Scratch(band.buffer, static_cast<size_t>(s.batch * s.in_channels * g.plane));
  if (band.call != call || band.first_image != n0) {
    band.call = call, band.first_image = n0, band.lo = band.hi = 0;
    RowStarts(s, g, buffer + n0 * s.in_channels * g.plane, Scratch(band.rows, static_cast<size_t>(s.group * s.patch_size())));
  }
  const int64_t last = k0 + kn - 1;
  const int64_t lo = (n0 + k0 / count) * hp + g.positions[k0 % count] / wp;
  const int64_t hi = (n0 + last / count) * hp + g.positions[last % count] / wp + (s.kernel_h - 1) * a.dilation_h + 1;
  // A thread claims its tasks in order, so a band usually starts within the rows it holds: extend them.
  if (band.lo < band.hi && band.lo <= lo && lo <= band.hi) {
    if (hi > band.hi) CopyRows(s, a, g, index, x, buffer, band.hi, hi);
    band.hi = std::max(hi, band.hi);
  } else {
    CopyRows(s, a, g, index, x, buffer, lo, hi);
    band.lo = lo, band.hi = hi;
  }
  return band.rows.data();
}

}  // namespace

PaddedGather BuildPaddedGather(const ConvShape& s, const ConvAttributes& a, const MaskPositions& mask,
                               const InputIndex* index) {
  PaddedGather g;
  const bool padding = a.pad_top || a.pad_left || a.pad_bottom || a.pad_right;
  const bool direct = index && s.taps() == 1 && !padding;  // a 1x1 conv reads the compact plane itself
  g.padded_h = s.in_h + a.pad_top + a.pad_bottom;
  g.padded_w = s.in_w + a.pad_left + a.pad_right;
  g.plane = direct ? index->compact_size : g.padded_h * g.padded_w;
  g.copy_needed = !direct && (index || padding);
  if (g.padded_h * g.padded_w >= (int64_t{1} << 31))  // ComputeConvShape refuses these first
    throw OpError("the padded input " + ShapeToString({g.padded_h, g.padded_w}) + " has 2^31 pixels or more");
  g.positions.assign(static_cast<size_t>(mask.count() + 16), 0);
  for (int64_t k = 0; k < mask.count(); ++k) {
    const int64_t oy = mask.positions[k] / mask.out_w, ox = mask.positions[k] % mask.out_w;
    const int64_t pixel = oy * a.stride_h * g.padded_w + ox * a.stride_w;
    g.positions[k] = direct ? index->values[pixel] : static_cast<int32_t>(pixel);
  }
  g.contiguous = true;
  for (int64_t k = 1; k < mask.count(); ++k) g.contiguous = g.contiguous && g.positions[k] == g.positions[0] + k;
  for (int64_t i = 0; i < s.kernel_h; ++i)
    for (int64_t j = 0; j < s.kernel_w; ++j)
      g.tap_offsets.push_back(static_cast<int32_t>(i * a.dilation_h * g.padded_w + j * a.dilation_w));
  if (index && g.copy_needed) {
    // The scalar copy through the index cost 16% of a perforated 64 -> 64 3x3 layer on a compact
    // 30x30 input at batch 32 (0.77 of 4.78 ms); the permutes take a sixteenth of its instructions.
    g.sources.assign(static_cast<size_t>(g.padded_h * g.padded_w), -1);
    for (int64_t y = 0; y < s.in_h; ++y)
      for (int64_t x = 0; x < s.in_w; ++x)
        g.sources[(y + a.pad_top) * g.padded_w + x + a.pad_left] = index->values[y * s.in_w + x];
    g.sources_plan = NNInterpolateCpu::PlanFloats(g.sources.data(), g.padded_h * g.padded_w);
  }
  return g;
}

// Output channels per group below which a one-channel group is accumulated directly: half of the
// AVX-512 micro-kernel's 16-row panel, under which the GEMM would compute mostly padding rows. Measured
// at 16 outputs from one channel (28x28, batch 32, r = 0.5): direct 0.625 ms, GEMM 0.069 ms.
constexpr int64_t kDepthwiseMaxOutputs = 8;

CpuConvStrategy ChooseCpuConvStrategy(const ConvShape& s) {
  // One input channel per group and few outputs from it (depthwise convolutions): direct accumulation.
  // Many outputs from one channel (a first layer on a grey image: 1 -> 16) share each gathered pixel
  // across the output channels only in the GEMM: direct accumulation re-gathered it per output channel
  // and ran 12x slower than ORT's Conv on Fashion-MNIST's first layer.
  if (s.in_channels_per_group() == 1 && (s.out_channels_per_group() < kDepthwiseMaxOutputs || !BestGemmIsa().width))
    return CpuConvStrategy::kDepthwise;
  return BestGemmIsa().width ? CpuConvStrategy::kPackedGemm : CpuConvStrategy::kBlasGemm;
}

std::shared_ptr<const CpuConvPlan> BuildCpuConvPlan(const ConvShape& s, const ConvAttributes& a,
                                                    MaskPositions positions,
                                                    std::shared_ptr<const InputIndex> input_index) {
  auto plan = std::make_shared<CpuConvPlan>();
  plan->strategy = ChooseCpuConvStrategy(s);
  plan->positions = std::move(positions);
  plan->input_index = std::move(input_index);
  if (plan->strategy == CpuConvStrategy::kPackedGemm)
    plan->padded = BuildPaddedGather(s, a, plan->positions, plan->input_index.get());
  else
    plan->gather = BuildGatherTable(s, a, plan->positions, plan->input_index.get());
  return plan;
}

std::shared_ptr<const PackedWeights> PerforatedConvCpu::PackWeightsFor(const ConvShape& s, const float* w) {
  if (ChooseCpuConvStrategy(s) != CpuConvStrategy::kPackedGemm) return nullptr;
  return PackWeights(w, s.group, s.out_channels_per_group(), s.patch_size(), BestGemmIsa());
}

namespace {

// The arguments every strategy takes.
struct ConvCall {
  const ConvShape& s;
  const ConvAttributes& a;
  const float* x;
  const float* w;
  const float* bias;
  float* yc;
  const ParallelRunner& parallel;

  // Bias and activation over n outputs of output channel m.
  void Finish(float* out, int64_t m, int64_t n) const {
    BiasActivation(out, n, bias ? bias[m] : 0.0f, a.activation, a.alpha, a.clip_min, a.clip_max);
  }
};

// Depthwise (and channel-multiplier) convolutions: direct accumulation, one output channel per task.
void DepthwiseConv(const ConvCall& c, const GatherTable& table) {
  const ConvShape& s = c.s;
  const int64_t count = table.count, taps = s.taps(), mg = s.out_channels_per_group();
  const int64_t block = ColumnBlock(count, s.batch * s.out_channels, 16, 128, 1024);
  const int64_t blocks = (count + block - 1) / block;
  c.parallel(static_cast<size_t>(s.batch * s.out_channels * blocks), [&](size_t t) {
    const int64_t b = t % blocks, nm = t / blocks, m = nm % s.out_channels, n = nm / s.out_channels;
    const int64_t k0 = b * block, kn = std::min(block, count - k0);
    const float* src = c.x + (n * s.in_channels + m / mg) * s.in_plane;
    float* out = c.yc + (n * s.out_channels + m) * count + k0;
    std::fill(out, out + kn, 0.0f);
    for (int64_t tap = 0; tap < taps; ++tap)
      GatherRowAxpy(src, table.offsets.data() + tap * count + k0, kn, c.w[m * taps + tap], out);
    c.Finish(out, m, kn);
  });
}

// Memory a task will read next, fetched into L2 a few cache lines per micro-tile while it computes:
// copied without it, an image's input arrived in one burst that no arithmetic overlapped.
struct Prefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t lines_per_tile = 0;

  void Step() {
    for (int64_t l = 0; l < lines_per_tile && next < end; ++l, next += 64) __builtin_prefetch(next, 0, 2);
  }
};

// One task's share of the implicit GEMM: columns [k0, k0 + kn) of group g, output panels [i0, i1).
// Column k reads rows[p][positions[k]]; it belongs to image k / count of `output` (a block may span the
// images of a micro-batch).
void GemmBlock(const ConvCall& c, const PackedWeights& packed, const float* const* rows, const int32_t* positions,
               int64_t count, float* output, int64_t g, int64_t k0, int64_t kn, int64_t i0, int64_t i1,
               Prefetch* prefetch = nullptr) {
  const ConvShape& s = c.s;
  const GemmIsa& isa = BestGemmIsa();
  const int64_t nr = isa.nr, mr = packed.mr, mg = s.out_channels_per_group(), patch = s.patch_size();
  const int64_t m0 = i0 * mr, m1 = std::min(mg, i1 * mr), width = (i1 - i0) * mr;
  if (m0 >= m1) return;
  const int64_t tiles = (kn + nr - 1) / nr;
  // tile[k * width + m]: the block's outputs, position-major, accumulated across KC passes.
  float* tile = Scratch(tls_tile, static_cast<size_t>(tiles * nr * width));
  const int64_t depth = PassDepth(patch);
  for (int64_t pc = 0; pc < patch; pc += depth) {
    const int64_t kc = std::min(depth, patch - pc);
    // The panels go in chunks that fit in L2: the first tile streams a chunk from L3 or memory (the
    // layers before evicted it), prefetching it, and the other tiles find it in L2. One chunk unless
    // the pass's weights exceed L2 (SqueezeNet's conv10: 1000 x 512).
    const int64_t chunk = std::max<int64_t>(1, L2Share() / (kc * mr * int64_t{sizeof(float)}));
    for (int64_t c0 = i0; c0 < i1; c0 += chunk) {
      const int64_t c1 = std::min(i1, c0 + chunk);
      for (int64_t j = 0; j < tiles; ++j) {
        const GemmIsa::Kernel tile_kernel = isa.Get(packed.vectors, kn - j * nr <= nr / 2, j == 0);
        for (int64_t i = c0; i < c1; ++i)
          tile_kernel(kc, packed.Panel(g, i) + pc * mr, rows + pc, positions + k0 + j * nr,
                      tile + j * nr * width + (i - i0) * mr, width, pc == 0);
        if (prefetch && c0 == i0) prefetch->Step();
      }
    }
  }
  // The block may span images: store each image's part into its own rows of Yc.
  const ConvAttributes& a = c.a;
  const Epilogue epilogue{c.bias ? c.bias + g * mg + m0 : nullptr, a.activation, a.alpha, a.clip_min, a.clip_max};
  for (int64_t k = k0; k < k0 + kn;) {
    const int64_t n = k / count, end = std::min(k0 + kn, (n + 1) * count);
    isa.store(tile + (k - k0) * width, width, m1 - m0, end - k, epilogue,
              output + (n * s.out_channels + g * mg + m0) * count + (k - n * count), count);
    k = end;
  }
}

// Whether the GEMM runs image by image, one task per image: with at least two images per core and
// enough positions per image for the weight panels' loads to pay (at 50 positions per image, 128 -> 128
// channels, the micro-batched GEMM was 6% faster). A padded (or interpolated) copy is then made per image
// too, where it is small enough to stay in L2 until the GEMM reads it: copied for the whole batch first,
// a compact 64 x 30 x 30 input at batch 32 (7.4 MB) went to memory and back. Without a copy, what the
// per-image form buys is the next image's input fetched during this one's GEMM: SqueezeNet's conv1
// (3 -> 64, stride 2, 224x224, batch 32) at r = 0.75 5.7 -> 4.5-4.8 ms.
constexpr int64_t kMaxImageCopyFloats = int64_t{96} << 10;  // 384 KiB

bool GemmPerImage(const ConvShape& s, const PaddedGather& padded, int64_t count) {
  return s.batch >= 2 * Cores() && count >= 8 * BestGemmIsa().nr &&
         (!padded.copy_needed || s.in_channels * padded.plane <= kMaxImageCopyFloats);
}

// The per-image form: one task per image (copied first into the thread's scratch where the GEMM needs
// a copy) multiplies it, every output channel, in column blocks of at most 16 tiles, and fetches the
// next image's input meanwhile.
void PerImageGemmConv(const ConvCall& c, const PaddedGather& padded, const InputIndex* input_index,
                      const PackedWeights& packed, int64_t count) {
  const ConvShape& s = c.s;
  const int64_t nr = BestGemmIsa().nr, patch = s.patch_size();
  const int64_t blocks = (count + 16 * nr - 1) / (16 * nr);
  const int64_t block = ((count + blocks - 1) / blocks + nr - 1) / nr * nr;
  const ParallelRunner serial = RunSerially;
  ConvShape image_shape = s;
  image_shape.batch = 1;
  const int64_t image_floats = s.in_channels * s.in_plane;
  // The next image's input is fetched while this one is multiplied (a guess when several threads
  // share the images: a wrong one still leaves it in the shared L3).
  const int64_t tile_steps = s.group * blocks * ((patch + PassDepth(patch) - 1) / PassDepth(patch)) *
                             ((block + nr - 1) / nr);
  const int64_t lines_per_tile = (image_floats * int64_t{sizeof(float)} / 64 + tile_steps - 1) / tile_steps;
  c.parallel(static_cast<size_t>(s.batch), [&](size_t n) {
    const float* x = c.x + n * image_floats;
    const float* image = x;
    if (padded.copy_needed) {
      float* copy = Scratch(tls_padded, static_cast<size_t>(s.in_channels * padded.plane));
      PadInput(image_shape, c.a, padded, input_index, x, copy, serial);
      image = copy;
    }
    const float** rows = Scratch(tls_rows, static_cast<size_t>(s.group * patch));
    RowStarts(s, padded, image, rows);
    float* output = c.yc + n * s.out_channels * count;
    Prefetch prefetch;
    if (static_cast<int64_t>(n) + 1 < s.batch) {
      prefetch.next = reinterpret_cast<const char*>(x + image_floats);
      prefetch.end = reinterpret_cast<const char*>(x + 2 * image_floats);
      prefetch.lines_per_tile = lines_per_tile;
    }
    for (int64_t g = 0; g < s.group; ++g)
      for (int64_t k0 = 0; k0 < count; k0 += block)
        GemmBlock(c, packed, rows + g * patch, padded.positions.data(), count, output, g, k0,
                  std::min(block, count - k0), 0, packed.panels, &prefetch);
  });
}

// Patches up to this long run through ChannelMajorGemm (packed_gemm.h) where the positions are
// contiguous and the input needs no copy (1x1 convolutions on a compact tensor, full-mask 1x1s). 1x1 on
// [N, C, 1, K], one thread, medians, ms (packed micro-kernel -> channel-major): 16 -> 64 channels, K = 756,
// batch 32 0.40 -> 0.24, batch 1 0.016 -> 0.012; 64 -> 64, K = 182, batch 32 0.244 -> 0.222; 128 -> 32
// 0.237 -> 0.278; 256 -> 64, K = 42, 0.19 -> 0.23. Gathered positions (SqueezeNet's conv1, patch 27) were
// slower through an im2col block, hardware gathers or not, than through the packed micro-kernel.
constexpr int64_t kChannelMajorMaxPatch = 64;

bool ChannelMajor(const ConvShape& s, const PaddedGather& padded) {
  return BestGemmIsa().width == 16 && s.group == 1 && !padded.copy_needed && padded.contiguous &&
         s.patch_size() <= kChannelMajorMaxPatch;
}

// Channel-major blocks of contiguous positions, read in place, one task per (image, block).
void ChannelMajorConv(const ConvCall& c, const PaddedGather& padded, int64_t count) {
  const ConvShape& s = c.s;
  const int64_t patch = s.patch_size();
  constexpr int64_t kMaxBlock = 192;
  const int64_t blocks = (count + kMaxBlock - 1) / kMaxBlock;
  const int64_t block = ((count + blocks - 1) / blocks + 15) / 16 * 16;
  const int64_t image_floats = s.in_channels * s.in_plane;
  const Epilogue epilogue{c.bias, c.a.activation, c.a.alpha, c.a.clip_min, c.a.clip_max};
  c.parallel(static_cast<size_t>(s.batch * blocks), [&](size_t t) {
    const int64_t n = static_cast<int64_t>(t) / blocks, k0 = static_cast<int64_t>(t) % blocks * block;
    const int64_t kn = std::min(block, count - k0);
    const float** rows = Scratch(tls_rows, static_cast<size_t>(2 * patch));
    RowStarts(s, padded, c.x + n * image_floats, rows);
    const float** xrows = rows + patch;
    for (int64_t p = 0; p < patch; ++p) xrows[p] = rows[p] + padded.positions[k0];
    ChannelMajorGemm(c.w, patch, s.out_channels, xrows, kn, epilogue, c.yc + n * s.out_channels * count + k0, count);
  });
}

// Implicit GEMM with this CPU's micro-kernel (packed_gemm.h), reading the (padded) input in place.
void PackedGemmConv(const ConvCall& c, const PaddedGather& padded, const InputIndex* input_index,
                    const PackedWeights& packed, int64_t count) {
  if (ChannelMajor(c.s, padded)) return ChannelMajorConv(c, padded, count);
  if (GemmPerImage(c.s, padded, count)) return PerImageGemmConv(c, padded, input_index, packed, count);
  const ConvShape& s = c.s;
  const int64_t patch = s.patch_size();
  const int64_t nr = BestGemmIsa().nr;
  const int64_t padded_plane = padded.plane;
  const float* input = c.x;
  const bool bands = padded.copy_needed && !padded.sources_plan &&
                     s.batch * s.in_channels * padded_plane <= kMaxBandCopyFloats;
  const uint64_t call = bands ? ++band_calls : 0;
  if (padded.copy_needed && !bands) {
    float* buffer = Scratch(tls_padded, static_cast<size_t>(s.batch * s.in_channels * padded_plane));
    PadInput(s, c.a, padded, input_index, c.x, buffer, c.parallel);
    input = buffer;
  }
  // Micro-batching: the images of a batch share one column space (image n's positions are offset by
  // its input plane), so small perforated layers still fill whole tiles and blocks. Chunks of images
  // keep the int32 offsets in range.
  const int64_t image = s.in_channels * padded_plane;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(s.batch, INT32_MAX / std::max<int64_t>(image, 1) - 1));
  for (int64_t n0 = 0; n0 < s.batch; n0 += chunk) {
    const int64_t images = std::min(chunk, s.batch - n0), columns = images * count;
    const int32_t* positions = padded.positions.data();
    if (images > 1) {
      int32_t* stacked = Scratch(tls_positions, static_cast<size_t>(columns + 16));
      for (int64_t n = 0; n < images; ++n)
        for (int64_t k = 0; k < count; ++k) stacked[n * count + k] = static_cast<int32_t>(n * image) + positions[k];
      std::fill(stacked + columns, stacked + columns + 16, 0);
      positions = stacked;
    }
    float* batch_output = c.yc + n0 * s.out_channels * count;
    // Built once per call, before the tasks (which only read it): per task it cost up to 4% of a small
    // layer (a division per row). Band copies keep row pointers of their own, per thread (BandRows).
    const float** rows_all = nullptr;
    if (!bands) {
      rows_all = Scratch(tls_rows, static_cast<size_t>(s.group * patch));
      RowStarts(s, padded, input + n0 * image, rows_all);
    }
    // Layers whose positions fit in one block per core split their output channels across the
    // cores instead (below): each core then streams only its share of the weights from L3.
    const int64_t max_block = 16 * nr;
    const bool split_channels = columns <= max_block * Cores() / 2 && packed.panels >= Cores();
    const int64_t block = split_channels ? (columns + nr - 1) / nr * nr
                                         : ColumnBlock(columns, s.group, nr, 2 * nr, max_block);
    const int64_t blocks = (columns + block - 1) / block;
    // Too few column blocks for the cores (small perforated layers): split the output channels too,
    // so each core streams only its share of the weights. Split ones go to several tasks per core:
    // the pool's tasks are claimed dynamically, so the calling thread takes over the work of a worker
    // that wakes late (spinning off) instead of waiting for it.
    constexpr int64_t kSplitTasksPerCore = 3;
    const int64_t wanted_tasks = split_channels ? kSplitTasksPerCore * Cores() : Cores();
    const int64_t outer_tasks = s.group * blocks;
    const int64_t wanted_splits =
        std::min(packed.panels, std::max<int64_t>(1, (wanted_tasks + outer_tasks - 1) / outer_tasks));
    const int64_t panels_per_split = (packed.panels + wanted_splits - 1) / wanted_splits;
    const int64_t splits = (packed.panels + panels_per_split - 1) / panels_per_split;  // none left empty
    c.parallel(static_cast<size_t>(s.group * blocks * splits), [&](size_t t) {
      const int64_t split = t % splits, b = (t / splits) % blocks, g = t / splits / blocks;
      const int64_t i0 = split * panels_per_split, i1 = std::min(packed.panels, i0 + panels_per_split);
      const int64_t k0 = b * block, kn = std::min(block, columns - k0);
      const float* const* rows =
          bands ? BandRows(s, c.a, padded, input_index, c.x, call, n0, count, k0, kn) : rows_all;
      GemmBlock(c, packed, rows + g * patch, positions, count, batch_output, g, k0, kn, i0, i1);
    });
  }
  // The padded copy is kept for the next call, unless it is large (big batches): then its memory
  // goes back rather than staying pinned to this thread.
  constexpr size_t kKeptFloats = size_t{16} << 20;  // 64 MiB
  if (tls_padded.size() > kKeptFloats) std::vector<float>().swap(tls_padded);
}

// im2col panels of a block of positions, multiplied by OpenBLAS.
void BlasGemmConv(const ConvCall& c, const GatherTable& table) {
  const ConvShape& s = c.s;
  const int64_t count = table.count, taps = s.taps();
  const int64_t cg = s.in_channels_per_group(), mg = s.out_channels_per_group(), patch = s.patch_size();
  const Blas& blas = GetBlas();
  const int64_t block = ColumnBlock(count, s.batch * s.group, 16, 128, 768);
  const int64_t blocks = (count + block - 1) / block;
  c.parallel(static_cast<size_t>(s.batch * s.group * blocks), [&](size_t t) {
    const int64_t b = t % blocks, ng = t / blocks, g = ng % s.group, n = ng / s.group;
    const int64_t k0 = b * block, kn = std::min(block, count - k0);
    float* panel = Scratch(tls_panel, static_cast<size_t>(patch * kn));
    // im2col panel [cg * taps, kn], restricted to this block of computed positions.
    for (int64_t ch = 0; ch < cg; ++ch) {
      const float* src = c.x + (n * s.in_channels + g * cg + ch) * s.in_plane;
      for (int64_t tap = 0; tap < taps; ++tap)
        GatherRow(src, table.offsets.data() + tap * count + k0, kn, panel + (ch * taps + tap) * kn);
    }
    float* out = c.yc + (n * s.out_channels + g * mg) * count + k0;
    blas.Sgemm(static_cast<int>(mg), static_cast<int>(kn), static_cast<int>(patch), c.w + g * mg * patch,
               static_cast<int>(patch), panel, static_cast<int>(kn), out, static_cast<int>(count));
    for (int64_t m = 0; m < mg; ++m) c.Finish(out + m * count, g * mg + m, kn);
  });
}

}  // namespace

void PerforatedConvCpu::Compute(const ConvShape& s, const ConvAttributes& a, const CpuConvPlan& plan, const float* x,
                                const float* w, const PackedWeights* packed, const float* bias, float* yc,
                                const ParallelRunner& parallel) {
  if (s.batch == 0 || s.out_channels == 0) return;
  const ConvCall call{s, a, x, w, bias, yc, parallel};
  if (s.patch_size() == 0) {  // no input channel: every output is the bias, as in ONNX Runtime's Conv
    const int64_t count = plan.positions.count();
    parallel(static_cast<size_t>(s.batch * s.out_channels), [&](size_t t) {
      float* out = yc + t * count;
      std::fill(out, out + count, 0.0f);
      call.Finish(out, static_cast<int64_t>(t) % s.out_channels, count);
    });
    return;
  }
  switch (plan.strategy) {
    case CpuConvStrategy::kDepthwise:
      return DepthwiseConv(call, plan.gather);
    case CpuConvStrategy::kPackedGemm:
      if (!packed) throw OpError("internal error: the packed-GEMM strategy was called without packed weights");
      return PackedGemmConv(call, plan.padded, plan.input_index.get(), *packed, plan.positions.count());
    case CpuConvStrategy::kBlasGemm:
      return BlasGemmConv(call, plan.gather);
  }
}

}  // namespace onnx_perforate
