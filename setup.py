"""Build hsoftmax: always the CPU kernels, plus the CUDA kernels when this torch has CUDA and nvcc
is found (never decided by whether a GPU is visible, so GPU-less build machines still ship CUDA).

Switches: FORCE_CUDA=1 (build CUDA kernels or fail), FORCE_ONLY_CPU=1 (skip them),
TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"), MAX_JOBS (parallel compile jobs), DEBUG=1.
Install after torch with: pip install --no-build-isolation .
"""

import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "hsoftmax needs PyTorch installed before it is built: `pip install torch`, then "
        "`pip install --no-build-isolation .` (build isolation would build against another torch)"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("FORCE_ONLY_CPU"):
        return False
    nvcc_found = CUDA_HOME is not None and (
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None
    )
    if _flag("FORCE_CUDA"):
        if torch.version.cuda is None or not nvcc_found:
            sys.exit(
                f"FORCE_CUDA=1 but torch {torch.__version__} has no CUDA (torch.version.cuda="
                f"{torch.version.cuda}) or nvcc was not found (CUDA_HOME={CUDA_HOME})"
            )
        return True
    return torch.version.cuda is not None and nvcc_found


def _cuda_include_dirs() -> list[str]:
    # ATen/cuda/CUDAContext.h includes cusparse.h; CUDA wheels of torch ship it under
    # site-packages/nvidia/*/include even when the system toolkit lacks it.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def extensions():
    with_cuda = _want_cuda()
    debug = _flag("DEBUG")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for only runs in parallel when _OPENMP is defined in our TU too.
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"]
    # -fno-trapping-math: we never read floating-point exception flags, and it lets the compiler
    # if-convert (and so vectorise) the branch-free binary-node loop. It changes no result.
    cxx += ["-fno-trapping-math"]
    cxx += ["-std=c++20", "-Wall", "-Wno-unknown-pragmas"]
    macros = []
    kwargs = {}
    extension = CppExtension
    if with_cuda:
        extension = CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("WITH_CUDA", None))
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++20"]
        if _flag("PTXAS_VERBOSE"):
            nvcc.append("-Xptxas=-v")
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        kwargs["include_dirs"] = [os.path.join(ROOT, "csrc")] + _cuda_include_dirs()
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        kwargs["include_dirs"] = [os.path.join(ROOT, "csrc")]
    print(f"hsoftmax: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels", flush=True)
    return [
        extension(
            "hsoftmax._C", sources, define_macros=macros, extra_link_args=["-fopenmp"], **kwargs
        )
    ]


# Everything else (name, version, dependencies, packages, entry point) is in pyproject.toml.
setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
