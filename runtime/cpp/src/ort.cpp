// ONNX Runtime's C API behind dlopen, with the Python runtime's session settings.
#include "ort.hpp"

#include <dlfcn.h>
#include <onnxruntime_c_api.h>

#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "files.hpp"

namespace starflow::native {
namespace {

std::string directory_of_this_library() {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&directory_of_this_library), &info) || !info.dli_fname) return ".";
  std::string path = info.dli_fname;
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

ONNXTensorElementDataType element_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case DType::f16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case DType::i64: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

std::mutex loading;
OrtLibrary* loaded = nullptr;  // the process's one library; never unloaded (sessions may outlive users)

}  // namespace

OrtLibrary& OrtLibrary::get(const std::string& path) {
  std::lock_guard<std::mutex> lock(loading);
  if (loaded) {
    if (!path.empty() && path != loaded->path())
      throw Error("ONNX Runtime library " + quoted(path) + ": this process already uses " + quoted(loaded->path()) +
                  " (one ONNX Runtime library per process)");
    return *loaded;
  }
  loaded = new OrtLibrary(path);
  return *loaded;
}

OrtLibrary::OrtLibrary(const std::string& path) {
  void* handle = nullptr;
  std::vector<std::string> tried;
  std::vector<std::string> candidates = {path};
  if (path.empty()) candidates = {directory_of_this_library() + "/libonnxruntime.so.1", "libonnxruntime.so.1"};
  for (const std::string& candidate : candidates) {
    handle = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle) {
      path_ = candidate;
      break;
    }
    tried.push_back(dlerror());
  }
  if (!handle) {
    std::string reasons;
    for (const std::string& reason : tried) reasons += "\n  " + reason;
    throw Error("cannot load the ONNX Runtime library (pass its path, e.g. the onnxruntime wheel's "
                "capi/libonnxruntime.so.1.*):" + reasons);
  }
  using GetApiBase = const OrtApiBase* (*)();
  auto base_of = reinterpret_cast<GetApiBase>(dlsym(handle, "OrtGetApiBase"));
  if (!base_of) throw Error(quoted(path_) + " is not an ONNX Runtime library (no OrtGetApiBase)");
  const OrtApiBase* base = base_of();
  api_ = base->GetApi(ORT_API_VERSION);
  if (!api_)
    throw Error(quoted(path_) + ": ONNX Runtime " + base->GetVersionString() + " does not offer C API version " +
                std::to_string(ORT_API_VERSION) + " (libstarflow needs ONNX Runtime 1.21 or newer)");
  check(api_->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "starflow", &env_));
  check(api_->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu_));
}

void OrtLibrary::check(void* status) const {
  if (!status) return;
  auto* s = static_cast<OrtStatus*>(status);
  std::string message = api_->GetErrorMessage(s);
  api_->ReleaseStatus(s);
  throw Error("ONNX Runtime: " + message);
}

Output::Output(const OrtLibrary& library, OrtValue* value) : library_(&library), value_(value) {
  const OrtApi& api = library.api();
  OrtTensorTypeAndShapeInfo* info = nullptr;
  library.check(api.GetTensorTypeAndShape(value, &info));
  ONNXTensorElementDataType type;
  std::size_t rank = 0;
  library.check(api.GetTensorElementType(info, &type));
  library.check(api.GetDimensionsCount(info, &rank));
  shape_.resize(rank);
  library.check(api.GetDimensions(info, shape_.data(), rank));
  api.ReleaseTensorTypeAndShapeInfo(info);
  if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) dtype_ = DType::f32;
  else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) dtype_ = DType::f16;
  else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) dtype_ = DType::i64;
  else throw Error("a graph output has element type " + std::to_string(type) + "; expected float32, float16 or int64");
  void* data = nullptr;
  library.check(api.GetTensorMutableData(value, &data));
  data_ = data;
}

Output::Output(Output&& other) noexcept
    : library_(other.library_), value_(other.value_), dtype_(other.dtype_), shape_(std::move(other.shape_)),
      data_(other.data_) {
  other.value_ = nullptr;
}

Output::~Output() {
  if (value_) library_->api().ReleaseValue(value_);
}

const float* Output::f32() const {
  if (dtype_ != DType::f32) throw Error("a graph output is " + dtype_name(dtype_) + ", expected float32");
  return static_cast<const float*>(data_);
}

Tensor Output::to_tensor() const {
  Tensor tensor(dtype_, shape_);
  std::memcpy(tensor.bytes.data(), data_, tensor.bytes.size());
  return tensor;
}

Session::Session(OrtLibrary& library, const std::string& name, const std::string& path,
                 const SessionSettings& settings)
    : library_(library), name_(name) {
  const OrtApi& api = library.api();
  OrtSessionOptions* options = nullptr;
  library.check(api.CreateSessionOptions(&options));
  std::unique_ptr<OrtSessionOptions, void (*)(OrtSessionOptions*)> owned(options, api.ReleaseSessionOptions);
  int threads = settings.threads > 0 ? settings.threads : static_cast<int>(std::thread::hardware_concurrency());
  library.check(api.SetIntraOpNumThreads(options, threads > 0 ? threads : 1));
  library.check(api.SetInterOpNumThreads(options, 1));
  library.check(api.SetSessionExecutionMode(options, ORT_SEQUENTIAL));
  library.check(api.SetSessionGraphOptimizationLevel(options, ORT_ENABLE_ALL));
  // As the Python runtime: spinning workers starve the orchestration between runs.
  library.check(api.AddSessionConfigEntry(options, "session.intra_op.allow_spinning", "0"));
  library.check(api.SetSessionLogSeverityLevel(options, 3));
  for (const Provider& provider : settings.providers) {
    std::vector<const char*> keys, values;
    for (std::size_t i = 0; i < provider.keys.size(); ++i) {
      keys.push_back(provider.keys[i].c_str());
      values.push_back(provider.values[i].c_str());
    }
    if (provider.name == "CUDA") {
      OrtCUDAProviderOptionsV2* cuda = nullptr;
      library.check(api.CreateCUDAProviderOptions(&cuda));
      std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> held(cuda, api.ReleaseCUDAProviderOptions);
      library.check(api.UpdateCUDAProviderOptions(cuda, keys.data(), values.data(), keys.size()));
      library.check(api.SessionOptionsAppendExecutionProvider_CUDA_V2(options, cuda));
    } else if (provider.name == "TensorRT") {
      OrtTensorRTProviderOptionsV2* trt = nullptr;
      library.check(api.CreateTensorRTProviderOptions(&trt));
      std::unique_ptr<OrtTensorRTProviderOptionsV2, void (*)(OrtTensorRTProviderOptionsV2*)> held(trt, api.ReleaseTensorRTProviderOptions);
      library.check(api.UpdateTensorRTProviderOptions(trt, keys.data(), values.data(), keys.size()));
      library.check(api.SessionOptionsAppendExecutionProvider_TensorRT_V2(options, trt));
    } else {
      library.check(api.SessionOptionsAppendExecutionProvider(options, provider.name.c_str(), keys.data(),
                                                              values.data(), keys.size()));
    }
  }
  try {
    library.check(api.CreateSession(library.env(), path.c_str(), options, &session_));
  } catch (const Error& err) {
    throw Error("graph " + name + " (" + path + "): " + err.what());
  }
  OrtAllocator* allocator = nullptr;
  library.check(api.GetAllocatorWithDefaultOptions(&allocator));
  auto names = [&](auto count_fn, auto name_fn, std::vector<std::string>& out) {
    std::size_t n = 0;
    library.check(count_fn(session_, &n));
    for (std::size_t i = 0; i < n; ++i) {
      char* text = nullptr;
      library.check(name_fn(session_, i, allocator, &text));
      out.emplace_back(text);
      library.check(api.AllocatorFree(allocator, text));
    }
  };
  names(api.SessionGetInputCount, api.SessionGetInputName, inputs_);
  names(api.SessionGetOutputCount, api.SessionGetOutputName, outputs_);
}

Session::~Session() {
  if (session_) library_.api().ReleaseSession(session_);
}

std::size_t Session::index_of(const std::string& output) const {
  for (std::size_t i = 0; i < outputs_.size(); ++i)
    if (outputs_[i] == output) return i;
  throw Error("graph " + name_ + " has no output '" + output + "'");
}

std::vector<Output> Session::run(const std::vector<Feed>& feeds) const {
  const OrtApi& api = library_.api();
  std::vector<const char*> names;
  std::vector<OrtValue*> values;
  auto release = [&] {
    for (OrtValue* v : values) api.ReleaseValue(v);
  };
  try {
    for (const Feed& feed : feeds) {
      OrtValue* value = nullptr;
      library_.check(api.CreateTensorWithDataAsOrtValue(
          library_.cpu(), const_cast<void*>(feed.data), count(feed.shape) * itemsize(feed.dtype), feed.shape.data(),
          feed.shape.size(), element_type(feed.dtype), &value));
      names.push_back(feed.name);
      values.push_back(value);
    }
    std::vector<const char*> output_names;
    for (const std::string& output : outputs_) output_names.push_back(output.c_str());
    std::vector<OrtValue*> results(outputs_.size(), nullptr);
    try {
      library_.check(api.Run(session_, nullptr, names.data(), values.data(), values.size(), output_names.data(),
                             output_names.size(), results.data()));
    } catch (const Error& err) {
      throw Error("graph " + name_ + ": " + err.what());
    }
    release();
    values.clear();
    std::vector<Output> outputs;
    outputs.reserve(results.size());
    for (std::size_t i = 0; i < results.size(); ++i) {
      try {
        outputs.emplace_back(library_, results[i]);
      } catch (...) {
        for (std::size_t j = i; j < results.size(); ++j) api.ReleaseValue(results[j]);
        throw;
      }
    }
    return outputs;
  } catch (...) {
    release();
    throw;
  }
}

}  // namespace starflow::native
