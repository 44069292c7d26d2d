// The bfloat16 engine's one rounding: a product operand the engine computes itself (h_{t-1},
// a layer's outputs, the gate gradients) rounded to the nearest bf16, as torch's own
// conversion does it (ties to even, NaN stays NaN), and kept in an fp32 slot. A product of two
// bf16 values is exact in fp32, so fp32 products on these operands are bf16 products with
// fp32 accumulation (geometry.h's Geometry::round_bf16).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fastbirnn {

template <typename T>
inline void round_to_bf16(T* values, int64_t n) {
  for (int64_t j = 0; j < n; ++j) values[j] = T(float(c10::BFloat16(float(values[j]))));
}

}  // namespace fastbirnn
