// ONNX Runtime through its C API, loaded with dlopen: the same libstarflow drives a CPU, CUDA or
// TensorRT build of ONNX Runtime, whichever library the caller points at.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "tensor.hpp"

struct OrtApi;
struct OrtEnv;
struct OrtSession;
struct OrtSessionOptions;
struct OrtMemoryInfo;
struct OrtValue;

namespace starflow::native {

struct Provider {
  std::string name;
  std::vector<std::string> keys, values;
};

struct SessionSettings {
  int threads = 0;  // 0: all cores
  std::vector<Provider> providers;
};

// The loaded library and its process-wide environment. Loaded once per process, never unloaded.
class OrtLibrary {
 public:
  // `path` empty: libonnxruntime.so.1 beside libstarflow, then the dynamic loader's search.
  static OrtLibrary& get(const std::string& path);
  const OrtApi& api() const { return *api_; }
  OrtEnv* env() const { return env_; }
  OrtMemoryInfo* cpu() const { return cpu_; }
  const std::string& path() const { return path_; }
  void check(void* status) const;  // an OrtStatus*: throws Error with its message, frees it

 private:
  OrtLibrary(const std::string& path);
  std::string path_;
  const OrtApi* api_ = nullptr;
  OrtEnv* env_ = nullptr;
  OrtMemoryInfo* cpu_ = nullptr;
};

// A view of caller-owned memory fed to a graph input.
struct Feed {
  const char* name;
  DType dtype;
  Shape shape;
  const void* data;
};

// One output, owned: ONNX Runtime allocated it.
class Output {
 public:
  Output(const OrtLibrary& library, OrtValue* value);
  Output(Output&& other) noexcept;
  Output(const Output&) = delete;
  ~Output();
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  const void* data() const { return data_; }
  const float* f32() const;  // refuses a non-float32 output
  Tensor to_tensor() const;

 private:
  const OrtLibrary* library_;
  OrtValue* value_;
  DType dtype_;
  Shape shape_;
  const void* data_ = nullptr;
};

// One graph's session, created once. `run` is not thread-safe (the pipeline serialises calls).
class Session {
 public:
  Session(OrtLibrary& library, const std::string& name, const std::string& path, const SessionSettings& settings);
  Session(const Session&) = delete;
  ~Session();
  const std::string& name() const { return name_; }
  const std::vector<std::string>& inputs() const { return inputs_; }
  const std::vector<std::string>& outputs() const { return outputs_; }
  // Runs with `feeds` (every input, by name) and returns every output, in `outputs()` order.
  std::vector<Output> run(const std::vector<Feed>& feeds) const;
  std::size_t index_of(const std::string& output) const;

 private:
  OrtLibrary& library_;
  std::string name_;
  OrtSession* session_ = nullptr;
  std::vector<std::string> inputs_, outputs_;
};

}  // namespace starflow::native
