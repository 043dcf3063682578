#include "blas.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "../shared/conv_geometry.h"

namespace onnx_perforate {

namespace {

constexpr const char* kLibraryName = "libscipy_openblas.so";
constexpr int kRowMajor = 101, kNoTrans = 111;

std::string DirectoryOfThisLibrary() {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&DirectoryOfThisLibrary), &info) || !info.dli_fname) return {};
  std::string path = info.dli_fname;
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

// OpenBLAS reads OPENBLAS_CORETYPE when it loads. On AVX-512 CPUs that its detection does not name it
// would otherwise pick Haswell (AVX2) kernels; SkylakeX kernels measured faster here (docs/benchmarks.md).
void PreferAvx512Kernels() {
  if (std::getenv("OPENBLAS_CORETYPE")) return;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    setenv("OPENBLAS_CORETYPE", "SKYLAKEX", 0);
}

Blas Load() {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("ONNX_PERFORATE_OPENBLAS")) candidates.push_back(env);
  const std::string here = DirectoryOfThisLibrary();
  // Installed layout: site-packages/onnx_perforate/lib/<this> and site-packages/scipy_openblas32/lib/.
  candidates.push_back(here + "/../../scipy_openblas32/lib/" + kLibraryName);
  candidates.push_back(kLibraryName);  // LD_LIBRARY_PATH or an already loaded copy

  PreferAvx512Kernels();
  std::string tried;
  for (const auto& path : candidates) {
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      tried += "\n  " + path + ": " + dlerror();
      continue;
    }
    Blas blas;
    blas.sgemm = reinterpret_cast<Blas::SgemmFn>(dlsym(handle, "scipy_cblas_sgemm"));
    auto set_threads = reinterpret_cast<void (*)(int)>(dlsym(handle, "scipy_openblas_set_num_threads"));
    if (!blas.sgemm || !set_threads) {
      tried += "\n  " + path + ": no scipy_cblas_sgemm / scipy_openblas_set_num_threads symbols";
      continue;
    }
    // Each GEMM runs inside one task of ORT's thread pool; OpenBLAS's own threads would oversubscribe.
    set_threads(1);
    return blas;
  }
  throw OpError("cannot load OpenBLAS (pip package scipy-openblas32); set ONNX_PERFORATE_OPENBLAS to "
                "the path of " + std::string(kLibraryName) + ". Tried:" + tried);
}

}  // namespace

void Blas::Sgemm(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c,
                 int ldc) const {
  sgemm(kRowMajor, kNoTrans, kNoTrans, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
}

const Blas& GetBlas() {
  static std::once_flag once;
  static Blas blas;
  static std::string error;
  std::call_once(once, [] {
    try {
      blas = Load();
    } catch (const OpError& e) {
      error = e.what();
    }
  });
  if (!error.empty()) throw OpError(error);
  return blas;
}

}  // namespace onnx_perforate
