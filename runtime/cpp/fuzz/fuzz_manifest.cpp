// libFuzzer: bytes as manifest.json, beside a record.json whose digest matches them, through every
// check load_manifest makes (the bounded JSON reader, the fields, the references between blocks and
// graphs). A refusal is an exception, as the C API turns it into a status; a crash, a hang or a
// sanitizer report is a finding.
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>

#include "manifest.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace native = starflow::native;
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  const std::string record = "{\"schema_version\": " + std::to_string(native::kSchemaVersion) +
                             ", \"manifest_sha256\": \"" + native::sha256_bytes(bytes) +
                             "\", \"validation\": [], \"engines\": []}";
  try {
    native::parse_manifest(bytes, "fuzz-export", [&] { return record; });
  } catch (const std::exception&) {  // every refusal (the C API's guarded() catches the same)
  }
  return 0;
}
