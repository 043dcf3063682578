#include "byte_transpose.h"

#include <immintrin.h>

#include <algorithm>

namespace onnx_perforate {

namespace {

// One 16 x 16 block through SSE unpacks.
template <typename T>
__attribute__((target("avx2,fma"))) void TransposeBlock16(const uint8_t* __restrict in, int64_t ldi, T* __restrict out,
                                                          int64_t ldo) {
  __m128i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i * ldi));
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
    t[i + 8] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm_unpacklo_epi16(t[2 * i], t[2 * i + 1]);
    r[i + 8] = _mm_unpackhi_epi16(t[2 * i], t[2 * i + 1]);
  }
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[i + 8] = _mm_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm_unpacklo_epi64(t[2 * i], t[2 * i + 1]);
    r[i + 8] = _mm_unpackhi_epi64(t[2 * i], t[2 * i + 1]);
  }
  // Four rounds of perfect shuffles leave column c in register bit_reverse(c).
  constexpr int kBitReversed[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  for (int c = 0; c < 16; ++c) {
    const __m128i column = r[kBitReversed[c]];
    if constexpr (sizeof(T) == 1)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c * ldo), column);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c * ldo), _mm256_cvtepu8_epi16(column));
  }
}

}  // namespace

template <typename T>
void TransposeBytes(const uint8_t* in, int64_t ldi, int64_t rows, int64_t cols, T* out, int64_t ldo, bool simd) {
  if (simd && rows >= 16 && cols >= 16) {
    // The last block of each direction overlaps the one before: elements written twice get the same value.
    for (int64_t r = 0; r < rows; r += 16) {
      const int64_t r0 = std::min(r, rows - 16);
      for (int64_t c = 0; c < cols; c += 16) {
        const int64_t c0 = std::min(c, cols - 16);
        TransposeBlock16(in + r0 * ldi + c0, ldi, out + c0 * ldo + r0, ldo);
      }
    }
    return;
  }
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) out[c * ldo + r] = static_cast<T>(in[r * ldi + c]);
}


template void TransposeBytes<uint8_t>(const uint8_t*, int64_t, int64_t, int64_t, uint8_t*, int64_t, bool);
template void TransposeBytes<int16_t>(const uint8_t*, int64_t, int64_t, int64_t, int16_t*, int64_t, bool);

}  // namespace onnx_perforate
