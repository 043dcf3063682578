// Which PerforatedConv kernel runs, with which tiles and reduction split: plain host code, so that the
// choice can be tested on a machine without a GPU (onnx_perforate_cuda_conv_launch in kernels.h).
#pragma once

namespace onnx_perforate {

// The two GEMM tile configurations of perforated_conv.cu (M x N x reduction step, threads per block).
constexpr int kBigTileM = 64, kBigTileN = 128, kBigTileK = 16, kBigTileThreads = (64 / 4) * (128 / 8);
constexpr int kSmallTileM = 32, kSmallTileN = 64, kSmallTileK = 16, kSmallTileThreads = (32 / 4) * (64 / 4);

// The direct kernel (one thread per computed position, kDirectChannels output channels) serves
// depthwise convolutions, and groups with few outputs (a GEMM tile would be mostly empty rows) as long
// as their reduction is short too: with many input channels per group the GEMM's shared-memory reuse
// wins even with part of the tile idle.
constexpr int kDirectMaxOutputsPerGroup = 15;
constexpr int kDirectMaxChannelsPerGroup = 16;

// Values match kernels.h's ONNX_PERFORATE_CUDA_CONV_* codes.
enum class ConvKernel { kNothing = 0, kBiasOnly = 1, kDirect = 2, kSmallTiles = 3, kBigTiles = 4 };

struct ConvLaunch {
  ConvKernel kernel = ConvKernel::kNothing;
  long long blocks = 0;       // GEMM blocks of one split (tiles x groups)
  int k_tiles = 0;            // reduction steps of the whole reduction
  int k_tiles_per_split = 0;  // reduction steps per block
  int splits = 1;             // > 1: partial sums added with atomics, then a bias + activation pass
};

// Arguments are assumed valid (checked by the entry point). sms: multiprocessors of the device;
// big_blocks_per_sm: how many big-tile blocks one multiprocessor holds at once (occupancy), so that
// big tiles are chosen only when they fill at least one full wave of the device.
ConvLaunch ChooseConvLaunch(long long batch, long long channels, long long outputs, long long group, long long taps,
                            long long positions, int sms, int big_blocks_per_sm, bool deterministic);

}  // namespace onnx_perforate
