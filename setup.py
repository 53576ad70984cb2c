"""Builds fastkd and its extension fastkd._C against the torch already installed.

    pip install --no-build-isolation -e .

CPU sources are always built; CUDA sources when a CUDA toolkit and GPU are usable, or when
FASTKD_FORCE_CUDA=1 (then for sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise).
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from the nvcc on PATH; a wrapper such as /usr/local/bin/nvcc makes that /usr/local,
# where libcudart is not: prefer the toolkit's conventional home when it exists.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda/lib64"):
    os.environ["CUDA_HOME"] = os.path.realpath("/usr/local/cuda")

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:
    raise SystemExit("fastkd builds against your installed torch: install torch first, then "
                     "`pip install --no-build-isolation -e .`") from error

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = re.search(r'__version__ = "([^"]+)"', open(os.path.join(HERE, "fastkd", "__init__.py")).read()).group(1)


def with_cuda() -> bool:
    if os.environ.get("FASTKD_FORCE_CUDA", "0") == "1":
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return True
    return CUDA_HOME is not None and torch.cuda.is_available()


def extension():
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # OpenMP: at::parallel_for is a header template that runs serially unless its caller is built with it
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    args = {"cxx": ["-O3"] + openmp}
    if not with_cuda():
        return CppExtension("fastkd._C", cpp, extra_compile_args=args, extra_link_args=openmp)
    args["nvcc"] = ["-O3"]
    return CUDAExtension("fastkd._C", cpp + sorted(glob.glob("csrc/cuda/*.cu")), extra_link_args=openmp,
                         define_macros=[("FASTKD_WITH_CUDA", None)], extra_compile_args=args)


setup(
    name="fastkd",
    version=VERSION,
    description="Fused Triton and C++/CUDA kernels for knowledge-distillation losses (L2D, TaT, LGD)",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fastkd", "fastkd.*"]),
    python_requires=">=3.10",
    # the lowest torch whose test suite was run (README, "Versions"); its Triton 3.6 runs the interpreted tests only
    # with numpy < 2.4 (tests/conftest.py skips them otherwise, saying so)
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "scikit-learn"],
                    # canvases, progress, plots, images, YAML configs, TensorBoard scalars
                    "train": ["scikit-learn", "tqdm", "matplotlib", "pillow", "pyyaml", "tensorboard"],
                    "coco": ["pycocotools"]},  # COCO2014 annotations
    entry_points={"console_scripts": ["fastkd-train = fastkd.recipes.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
