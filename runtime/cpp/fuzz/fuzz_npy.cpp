// libFuzzer: bytes as a .npy file through libstarflow's reader (header, dtype, shape, sizes). A
// refusal is an exception, as the C API turns it into a status; a crash, a hang, an allocation past
// libFuzzer's limit or a sanitizer report is a finding.
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>

#include "tensor.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    starflow::native::parse_npy(std::string(reinterpret_cast<const char*>(data), size), "fuzz.npy");
  } catch (const std::exception&) {  // every refusal (the C API's guarded() catches the same)
  }
  return 0;
}
