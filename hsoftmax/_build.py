"""Load the compiled library and refuse a torch it was not built for."""

from __future__ import annotations

import torch

try:
    from hsoftmax import _C  # noqa: F401  (loading registers torch.ops.hsoftmax.*)
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        f"hsoftmax's compiled extension could not be loaded ({e}). It was probably built against "
        f"another torch than the installed {torch.__version__}; rebuild it with "
        "`pip install --no-build-isolation --force-reinstall --no-deps .`"
    ) from e


def _parse(info: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in info.split(";"))


BUILD_INFO = _parse(torch.ops.hsoftmax.build_info())


def _release(version: str) -> str:
    return version.split("+", 1)[0]


if _release(BUILD_INFO["torch"]) != _release(torch.__version__):
    raise ImportError(
        f"hsoftmax was built against torch {BUILD_INFO['torch']} but torch {torch.__version__} is "
        "installed; rebuild with `pip install --no-build-isolation --force-reinstall --no-deps .`"
    )


def cuda_version() -> int | None:
    """The CUDA version the kernels were compiled with (e.g. 13000), or None for a CPU build."""
    v = BUILD_INFO["cuda"]
    return None if v == "none" else int(v)


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were compiled into this install."""
    return cuda_version() is not None


if has_cuda_kernels() and torch.version.cuda is not None:
    built_major = cuda_version() // 1000
    torch_major = int(torch.version.cuda.split(".")[0])
    if built_major != torch_major:
        raise ImportError(
            f"hsoftmax's CUDA kernels were built with CUDA {cuda_version() // 1000}."
            f"{cuda_version() % 1000 // 10} but torch uses CUDA {torch.version.cuda}; rebuild with "
            "a matching toolkit"
        )
