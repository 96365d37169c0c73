"""Pure functions on tensors: no modules, no parameters. Each op has a reference (the spec) beside its
fast paths; ``_backend`` decides between PyTorch and Triton. (Softmax attention is
``seqblocks.ops.attention.attention``; it is not re-exported here, where the name would hide the
subpackage.)"""

from seqblocks.ops._backend import prefer_backend, resolve_backend, triton_available
from seqblocks.ops.add_norm import add_norm, add_norm_ref
from seqblocks.ops.attention import linear_attention
from seqblocks.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from seqblocks.ops.discretize import discretize
from seqblocks.ops.fftconv import fftconv, fftconv_ref
from seqblocks.ops.scan import linear_scan, linear_scan_ref
from seqblocks.ops.selective_scan import selective_scan, selective_state_update
from seqblocks.ops.ssd import ssd, ssd_state_update

__all__ = ["add_norm", "add_norm_ref", "prefer_backend", "resolve_backend", "triton_available", "causal_conv1d",
           "causal_conv1d_update", "selective_scan", "selective_state_update", "discretize", "fftconv", "fftconv_ref",
           "linear_scan", "linear_scan_ref", "linear_attention", "ssd", "ssd_state_update"]
