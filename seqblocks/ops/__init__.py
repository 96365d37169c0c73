"""Pure functions on tensors: no modules, no parameters. Each op has a reference (the spec) beside its
fast paths; ``_backend`` decides between PyTorch and Triton."""

from seqblocks.ops._backend import resolve_backend, triton_available
from seqblocks.ops.add_norm import add_norm, add_norm_ref

__all__ = ["add_norm", "add_norm_ref", "resolve_backend", "triton_available"]
