// ctest: the library registers its ops with the dispatcher and they run.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastkd::_build_info", "").typed<std::string()>();
  const std::string info = op.call();
  std::cout << "fastkd::_build_info -> " << info << std::endl;
  return info.rfind("cpu", 0) == 0 ? 0 : 1;
}
