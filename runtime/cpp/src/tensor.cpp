// Tensors and the files they travel in: .npy in and out, PNG out, sha256 of inputs.
#include "tensor.hpp"

#include <openssl/evp.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <sstream>

namespace starflow::native {
namespace {

constexpr std::size_t kMaxTensorBytes = std::size_t{1} << 36;  // 64 GiB: past that a shape is a typo

}  // namespace

namespace {

// The value of `key` in a .npy header dict: "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }".
std::string header_field(const std::string& header, const std::string& key, const std::string& path) {
  auto at = header.find("'" + key + "'");
  if (at == std::string::npos) throw Error(path + ": not a .npy file (no '" + key + "' in its header)");
  at = header.find(':', at);
  if (at == std::string::npos) throw Error(path + ": malformed .npy header");
  ++at;
  while (at < header.size() && header[at] == ' ') ++at;
  std::size_t end = at;
  if (header[at] == '(') {
    end = header.find(')', at);
    if (end == std::string::npos) throw Error(path + ": malformed .npy shape");
    return header.substr(at, end - at + 1);
  }
  while (end < header.size() && header[end] != ',' && header[end] != '}') ++end;
  return header.substr(at, end - at);
}

}  // namespace

std::size_t itemsize(DType dtype) { return dtype == DType::f16 ? 2 : dtype == DType::f32 ? 4 : 8; }

std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::i64: return "int64";
  }
  return "unknown";
}

DType dtype_of(const std::string& name, const std::string& where) {
  if (name == "float32") return DType::f32;
  if (name == "float16") return DType::f16;
  if (name == "int64") return DType::i64;
  throw Error(where + ": dtype '" + name + "' is not one of float32, float16, int64");
}

std::string shape_text(const Shape& shape) {
  std::ostringstream out;
  out << '(';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

std::size_t count(const Shape& shape) {
  std::size_t n = 1;
  for (int64_t d : shape) n *= static_cast<std::size_t>(d);
  return n;
}

std::size_t Tensor::bytes_for(DType dtype, const Shape& shape) {
  std::size_t n = itemsize(dtype);
  for (int64_t d : shape) {
    if (d < 0) throw Error("tensor shape " + shape_text(shape) + " has a negative dimension");
    if (d && n > kMaxTensorBytes / static_cast<std::size_t>(d))
      throw Error("tensor shape " + shape_text(shape) + " is too large (over 64 GiB)");
    n *= static_cast<std::size_t>(d);
  }
  return n;
}

Tensor::Tensor(DType dtype_, Shape shape_) : dtype(dtype_), shape(std::move(shape_)) {
  bytes.assign(bytes_for(dtype, shape), 0);
}

float* Tensor::f32() { return reinterpret_cast<float*>(bytes.data()); }
const float* Tensor::f32() const { return reinterpret_cast<const float*>(bytes.data()); }
int64_t* Tensor::i64() { return reinterpret_cast<int64_t*>(bytes.data()); }
const int64_t* Tensor::i64() const { return reinterpret_cast<const int64_t*>(bytes.data()); }

Tensor load_npy(const std::string& path) { return parse_npy(read_file(path, kMaxTensorBytes), path); }

Tensor parse_npy(const std::string& data, const std::string& path) {
  if (data.size() < 10 || data.compare(0, 6, "\x93NUMPY") != 0) throw Error(path + ": not a .npy file");
  int major = static_cast<unsigned char>(data[6]);
  std::size_t length, offset;
  if (major == 1) {
    length = static_cast<unsigned char>(data[8]) | static_cast<std::size_t>(static_cast<unsigned char>(data[9])) << 8;
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (data.size() < 12) throw Error(path + ": truncated .npy header");
    length = 0;
    for (int i = 3; i >= 0; --i) length = length << 8 | static_cast<unsigned char>(data[8 + i]);
    offset = 12;
  } else {
    throw Error(path + ": .npy format version " + std::to_string(major) + " is not supported");
  }
  if (offset + length > data.size()) throw Error(path + ": truncated .npy header");
  std::string header = data.substr(offset, length);
  std::string descr = header_field(header, "descr", path);
  std::string fortran = header_field(header, "fortran_order", path);
  std::string shape_field = header_field(header, "shape", path);
  DType dtype;
  if (descr == "'<f4'") dtype = DType::f32;
  else if (descr == "'<f2'") dtype = DType::f16;
  else if (descr == "'<i8'") dtype = DType::i64;
  else throw Error(path + ": dtype " + descr + " is not supported; expected float32 ('<f4'), float16 or int64");
  if (fortran != "False") throw Error(path + ": Fortran-ordered arrays are not supported; save a C-ordered copy");
  if (shape_field.size() < 2 || shape_field.front() != '(') throw Error(path + ": malformed .npy shape " + shape_field);
  Shape shape;
  std::string inner = shape_field.substr(1, shape_field.size() - 2);
  std::stringstream items(inner);
  for (std::string item; std::getline(items, item, ',');) {
    if (item.find_first_not_of(' ') == std::string::npos) continue;
    try {
      shape.push_back(std::stoll(item));
    } catch (const std::exception&) {
      throw Error(path + ": malformed .npy shape " + shape_field);
    }
  }
  const std::size_t needed = Tensor::bytes_for(dtype, shape);  // checked before any memory is taken
  if (data.size() - offset - length != needed)
    throw Error(path + ": holds " + std::to_string(data.size() - offset - length) + " data bytes; shape " +
                shape_text(shape) + " needs " + std::to_string(needed));
  Tensor tensor(dtype, shape);
  if (needed) std::memcpy(tensor.bytes.data(), data.data() + offset + length, needed);  // empty: no buffer at all
  return tensor;
}

void save_npy(const Tensor& tensor, const std::string& path) {
  const char* descr = tensor.dtype == DType::f32 ? "<f4" : tensor.dtype == DType::f16 ? "<f2" : "<i8";
  std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': " +
                       shape_text(tensor.shape) + ", }";
  std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::string data("\x93NUMPY\x01\x00", 8);
  data.push_back(static_cast<char>(header.size() & 0xff));
  data.push_back(static_cast<char>(header.size() >> 8));
  data += header;
  data.append(reinterpret_cast<const char*>(tensor.bytes.data()), tensor.bytes.size());
  write_atomically(path, data);
}

namespace {

uint32_t crc32(const unsigned char* data, std::size_t n, uint32_t crc = 0) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

void put32(std::string& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<char>(v >> shift & 0xff));
}

void chunk(std::string& out, const char* type, const std::string& body) {
  put32(out, static_cast<uint32_t>(body.size()));
  std::string typed = std::string(type, 4) + body;
  out += typed;
  put32(out, crc32(reinterpret_cast<const unsigned char*>(typed.data()), typed.size()));
}

}  // namespace

void save_png(const Tensor& images, std::size_t index, const std::string& path) {
  if (images.dtype != DType::f32 || images.shape.size() != 4 || (images.shape[3] != 1 && images.shape[3] != 3))
    throw Error("images: expected (N, H, W, C) float32 with C = 1 or 3, got " + dtype_name(images.dtype) + " " +
                shape_text(images.shape));
  if (images.shape[1] < 1 || images.shape[2] < 1)
    throw Error("images: an image needs at least one pixel, got shape " + shape_text(images.shape));
  if (index >= static_cast<std::size_t>(images.shape[0]))
    throw Error("images: index " + std::to_string(index) + " is outside a batch of " +
                std::to_string(images.shape[0]));
  auto h = static_cast<std::size_t>(images.shape[1]), w = static_cast<std::size_t>(images.shape[2]);
  auto c = static_cast<std::size_t>(images.shape[3]);
  const float* pixels = images.f32() + index * h * w * c;
  const std::size_t bad = static_cast<std::size_t>(
      std::count_if(pixels, pixels + h * w * c, [](float v) { return !std::isfinite(v); }));
  if (bad)
    throw Error("images: image " + std::to_string(index) + " has " + std::to_string(bad) +
                " pixel values that are NaN or inf, which a PNG cannot hold (refused: " + path + ")");
  std::string raw;  // each row: filter type 0, then the row's bytes
  for (std::size_t y = 0; y < h; ++y) {
    raw.push_back('\0');
    for (std::size_t i = 0; i < w * c; ++i) {
      float v = std::min(std::max(pixels[y * w * c + i], 0.0f), 1.0f) * 255.0f;
      raw.push_back(static_cast<char>(static_cast<unsigned char>(std::nearbyint(v))));  // numpy's round
    }
  }
  std::string zlib("\x78\x01", 2);  // a zlib stream of stored (uncompressed) deflate blocks
  for (std::size_t at = 0; at < raw.size(); at += 65535) {
    std::size_t n = std::min<std::size_t>(65535, raw.size() - at);
    zlib.push_back(at + n == raw.size() ? 1 : 0);  // BFINAL on the last block
    zlib.push_back(static_cast<char>(n & 0xff));
    zlib.push_back(static_cast<char>(n >> 8));
    zlib.push_back(static_cast<char>(~n & 0xff));
    zlib.push_back(static_cast<char>(~n >> 8 & 0xff));
    zlib.append(raw, at, n);
  }
  uint32_t a = 1, b = 0;  // adler32
  for (unsigned char byte : raw) {
    a = (a + byte) % 65521;
    b = (b + a) % 65521;
  }
  put32(zlib, b << 16 | a);
  std::string ihdr;
  put32(ihdr, static_cast<uint32_t>(w));
  put32(ihdr, static_cast<uint32_t>(h));
  ihdr += std::string{8, static_cast<char>(c == 3 ? 2 : 0), 0, 0, 0};
  std::string png("\x89PNG\r\n\x1a\n", 8);
  chunk(png, "IHDR", ihdr);
  chunk(png, "IDAT", zlib);
  chunk(png, "IEND", "");
  write_atomically(path, png);
}

namespace {

// Lowercase hex sha256 of everything `feed` passes to its callback.
template <typename Feed>
std::string sha256_of(Feed feed) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> context(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!context || EVP_DigestInit_ex(context.get(), EVP_sha256(), nullptr) != 1) throw Error("sha256: OpenSSL failed");
  feed([&](const char* data, std::size_t n) { EVP_DigestUpdate(context.get(), data, n); });
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(context.get(), digest, &length);
  static const char* hex = "0123456789abcdef";
  std::string text;
  for (unsigned int i = 0; i < length; ++i) {
    text.push_back(hex[digest[i] >> 4]);
    text.push_back(hex[digest[i] & 15]);
  }
  return text;
}

}  // namespace

std::string sha256_bytes(const std::string& data) {
  return sha256_of([&](auto update) { update(data.data(), data.size()); });
}

std::string sha256_file(const std::string& path) {
  RegularFile file(path);
  return sha256_of([&](auto update) {
    std::vector<char> buffer(1 << 20);
    for (;;) {
      ssize_t n = ::read(file.fd(), buffer.data(), buffer.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw Error("cannot read " + quoted(path) + ": " + std::strerror(errno));
      if (n == 0) break;
      update(buffer.data(), static_cast<std::size_t>(n));
    }
  });
}

}  // namespace starflow::native
