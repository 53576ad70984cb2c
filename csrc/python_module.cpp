// Python entry point of fastkd._C: an empty module whose import runs the static TORCH_LIBRARY
// registrations. Built by setup.py only; the CMake library has no Python dependency.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
