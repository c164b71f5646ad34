"""hsoftmax: a fused hierarchical-softmax output head for PyTorch.

``import hsoftmax`` loads the compiled op library (``torch.ops.hsoftmax.*``) and checks that it
was built for the installed torch.
"""

from hsoftmax import ops
from hsoftmax._build import cuda_version, has_cuda_kernels
from hsoftmax._version import __version__
from hsoftmax.nn import DenseSoftmax, HierarchicalSoftmax
from hsoftmax.tree import Tree

__all__ = [
    "Tree",
    "HierarchicalSoftmax",
    "DenseSoftmax",
    "ops",
    "cuda_version",
    "has_cuda_kernels",
    "__version__",
]
