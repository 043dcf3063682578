// A C++ program running a perforated model in ONNX Runtime with the onnx-perforate custom-op library
// registered through Ort::SessionOptions::RegisterCustomOpsLibrary (docs/deployment.md).
//
// usage: perforated_client MODEL LIBRARY INPUT.f32 DIMS [EXPECTED.f32 [RTOL ATOL]]
//   MODEL     the .onnx file (custom-op or portable form)
//   LIBRARY   libonnx_perforate_ops.so ("-" runs without it: only a portable model loads then)
//   INPUT.f32 the model's single input as raw little-endian float32, DIMS its shape (e.g. 8,1,28,28)
//   EXPECTED  raw float32 of the first output: every value must satisfy |y - e| <= ATOL + RTOL * |e|
//             (defaults 1e-4, 1e-4)
// Prints the output shape and the largest difference; exit status 0 when the output matches (or no
// EXPECTED is given), 1 when it does not, 2 on an error (message on stderr).

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

std::vector<float> ReadFloats(const std::string& path) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) throw std::runtime_error("cannot open " + path);
  const std::streamsize bytes = file.tellg();
  if (bytes % sizeof(float)) throw std::runtime_error(path + " is not a whole number of float32 values");
  std::vector<float> values(static_cast<size_t>(bytes) / sizeof(float));
  file.seekg(0);
  file.read(reinterpret_cast<char*>(values.data()), bytes);
  return values;
}

std::vector<int64_t> ParseDims(const std::string& text) {
  std::vector<int64_t> dims;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, ',')) dims.push_back(std::stoll(part));
  if (dims.empty()) throw std::runtime_error("DIMS is empty");
  return dims;
}

std::string ShapeText(const std::vector<int64_t>& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

int Run(int argc, char** argv) {
  if (argc != 5 && argc != 6 && argc != 8) {
    std::cerr << "usage: " << argv[0] << " MODEL LIBRARY INPUT.f32 DIMS [EXPECTED.f32 [RTOL ATOL]]\n";
    return 2;
  }
  const std::string model = argv[1], library = argv[2];
  std::vector<float> input = ReadFloats(argv[3]);
  const std::vector<int64_t> dims = ParseDims(argv[4]);
  int64_t count = 1;
  for (const int64_t d : dims) count *= d;
  if (count != static_cast<int64_t>(input.size()))
    throw std::runtime_error(std::string(argv[3]) + " holds " + std::to_string(input.size()) +
                             " values, DIMS " + ShapeText(dims) + " needs " + std::to_string(count));

  Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "perforated_client");
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(1);
  if (library != "-") options.RegisterCustomOpsLibrary(library.c_str());
  Ort::Session session(env, model.c_str(), options);

  Ort::AllocatorWithDefaultOptions allocator;
  const auto input_name = session.GetInputNameAllocated(0, allocator);
  const auto output_name = session.GetOutputNameAllocated(0, allocator);
  const auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::Value tensor = Ort::Value::CreateTensor<float>(memory, input.data(), input.size(), dims.data(), dims.size());
  const char* input_names[] = {input_name.get()};
  const char* output_names[] = {output_name.get()};
  auto outputs = session.Run(Ort::RunOptions{nullptr}, input_names, &tensor, 1, output_names, 1);

  const auto info = outputs[0].GetTensorTypeAndShapeInfo();
  const float* y = outputs[0].GetTensorData<float>();
  const size_t size = info.GetElementCount();
  std::cout << output_name.get() << ": " << ShapeText(info.GetShape()) << "\n";
  if (argc == 5) return 0;

  const std::vector<float> expected = ReadFloats(argv[5]);
  if (expected.size() != size)
    throw std::runtime_error("the output has " + std::to_string(size) + " values, " + argv[5] + " holds " +
                             std::to_string(expected.size()));
  const double rtol = argc == 8 ? std::atof(argv[6]) : 1e-4, atol = argc == 8 ? std::atof(argv[7]) : 1e-4;
  double worst = 0.0;
  size_t mismatches = 0;
  for (size_t i = 0; i < size; ++i) {
    const double difference = std::fabs(static_cast<double>(y[i]) - expected[i]);
    worst = std::max(worst, difference);
    if (!(difference <= atol + rtol * std::fabs(expected[i]))) ++mismatches;
  }
  std::cout << "max abs difference " << worst << ", " << mismatches << " of " << size << " values outside tolerance\n";
  return mismatches ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& error) {
    std::cerr << "perforated_client: error: " << error.what() << "\n";
    return 2;
  }
}
