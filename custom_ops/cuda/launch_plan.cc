#include "launch_plan.h"

namespace onnx_perforate {

namespace {
long long CeilDiv(long long a, long long b) { return (a + b - 1) / b; }
}  // namespace

ConvLaunch ChooseConvLaunch(long long batch, long long channels, long long outputs, long long group, long long taps,
                            long long positions, int sms, int big_blocks_per_sm, bool deterministic) {
  ConvLaunch launch;
  if (batch == 0 || outputs == 0 || positions == 0) return launch;
  const long long cg = channels / group, mg = outputs / group;
  if (cg == 0) {  // C == 0: the sums are empty, the output is activation(bias)
    launch.kernel = ConvKernel::kBiasOnly;
    return launch;
  }
  if (cg == 1 || (mg <= kDirectMaxOutputsPerGroup && cg <= kDirectMaxChannelsPerGroup)) {
    launch.kernel = ConvKernel::kDirect;
    return launch;
  }
  // Big tiles when they fill at least one wave (every SM holding as many blocks as fit at once);
  // otherwise small tiles, and when even those leave SMs idle on a long reduction, split the
  // reduction (split-K) over more blocks.
  const long long cols = batch * positions;
  const long long big_blocks = CeilDiv(cols, kBigTileN) * CeilDiv(mg, kBigTileM) * group;
  const bool big = big_blocks >= static_cast<long long>(sms) * (big_blocks_per_sm > 0 ? big_blocks_per_sm : 1);
  launch.kernel = big ? ConvKernel::kBigTiles : ConvKernel::kSmallTiles;
  const int bm = big ? kBigTileM : kSmallTileM, bn = big ? kBigTileN : kSmallTileN;
  const int bk = big ? kBigTileK : kSmallTileK;
  launch.blocks = CeilDiv(cols, bn) * CeilDiv(mg, bm) * group;
  launch.k_tiles = static_cast<int>(CeilDiv(cg * taps, bk));
  launch.k_tiles_per_split = launch.k_tiles;
  if (!big && !deterministic && launch.blocks < sms && launch.k_tiles >= 8) {
    // Aim at ~2 blocks per SM, each split keeping >= 4 reduction tiles.
    long long splits = CeilDiv(2LL * sms, launch.blocks);
    if (splits > launch.k_tiles / 4) splits = launch.k_tiles / 4;
    if (splits > 1) {
      launch.k_tiles_per_split = static_cast<int>(CeilDiv(launch.k_tiles, splits));
      launch.splits = static_cast<int>(CeilDiv(launch.k_tiles, launch.k_tiles_per_split));
    }
  }
  return launch;
}

}  // namespace onnx_perforate
