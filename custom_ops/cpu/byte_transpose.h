// Byte-matrix transposes for the 8-bit kernels, where data changes between channel-major and
// position-major: NCHW -> NHWC for PerforatedQLinearConv's input, its requantized position-major tiles
// -> Yc's rows, and CompactPool's 8-bit planes <-> pixel rows.
#pragma once

#include <cstdint>

namespace onnx_perforate {

// out[c * ldo + r] = in[r * ldi + c] for a rows x cols byte block: 16 x 16 blocks through SSE unpacks
// (AVX2 machines only: `simd` false takes the scalar loop), the edges element by element. T = int16_t
// widens on the way (the AVX2 quantized kernel's input buffer); T = uint8_t copies.
template <typename T>
void TransposeBytes(const uint8_t* in, int64_t ldi, int64_t rows, int64_t cols, T* out, int64_t ldo, bool simd);

}  // namespace onnx_perforate
