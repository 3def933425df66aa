"""Built-in backends. Importing this package registers them; each module is one family and
imports its native libraries (Triton, CuPy) lazily, so `import qkernels` never fails for them."""

from . import torch_native  # noqa: F401
from . import triton_backends  # noqa: F401
from . import cublaslt_backend  # noqa: F401
