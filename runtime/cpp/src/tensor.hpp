// Dense tensors, errors and file helpers shared by the library's parts.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "files.hpp"

namespace starflow::native {

// Every failure is one of these; the C API turns it into an sf_status.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class DType : int { f32 = 1, i64 = 7, f16 = 10 };  // ONNX element codes

std::size_t itemsize(DType dtype);
std::string dtype_name(DType dtype);  // numpy's names: float32, int64, float16
DType dtype_of(const std::string& name, const std::string& where);

using Shape = std::vector<int64_t>;
std::string shape_text(const Shape& shape);  // "(2, 16, 4)"
std::size_t count(const Shape& shape);

// A row-major array that owns its bytes.
struct Tensor {
  DType dtype = DType::f32;
  Shape shape;
  std::vector<unsigned char> bytes;

  Tensor() = default;
  Tensor(DType dtype, Shape shape);  // zero-filled; refuses negative dims and absurd sizes
  static std::size_t bytes_for(DType dtype, const Shape& shape);  // what it holds, or the refusal
  std::size_t size() const { return count(shape); }
  float* f32();
  const float* f32() const;
  int64_t* i64();
  const int64_t* i64() const;
};

// .npy files (format 1.0/2.0, little-endian float32/float16/int64, C order); parse_npy reads one's
// bytes (`path` names it in errors).
Tensor load_npy(const std::string& path);
Tensor parse_npy(const std::string& data, const std::string& path);
void save_npy(const Tensor& tensor, const std::string& path);  // through write_atomically
// An (N, H, W, C) float32 image in [0, 1] as an 8-bit PNG (stored deflate blocks; no zlib); NaN or
// inf pixels are refused (a PNG cannot hold them).
void save_png(const Tensor& images, std::size_t index, const std::string& path);

std::string sha256_file(const std::string& path);  // a regular file
std::string sha256_bytes(const std::string& data);

}  // namespace starflow::native
