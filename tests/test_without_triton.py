"""seqblocks without the optional ``triton`` package: a subprocess blocks its import
(``sys.modules["triton"] = None``) and runs what must still work. The whole suite runs the same way:
``python -c "import sys; sys.modules['triton'] = None; import pytest; sys.exit(pytest.main(['-q']))"``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # import triton now raises ImportError, as when it is not installed
    import pytest
    import torch
    import seqblocks
    from seqblocks.ops._backend import triton_available
    from seqblocks.ops.scan import linear_scan

    assert not triton_available()
    a, b = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="CUDA tensors"):  # the input check comes before the import
        linear_scan(a, b, backend="triton")
    linear_scan(a, b, backend="auto")
    if torch.cuda.is_available():
        with pytest.raises(ImportError, match="seqblocks\\\\[triton\\\\]"):
            linear_scan(a.cuda(), b.cuda(), backend="triton")
    model = seqblocks.LRNNLMHeadModel(16, 4, 3, 20, ["Mamba", "S5", "attn"],
                                     mixer_kwargs={"attn": {"num_heads": 2}})
    ids = torch.randint(0, 20, (2, 6))
    assert torch.isfinite(model(ids).logits).all()
    assert "triton" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
    print("ok")
""")


def test_library_works_with_triton_blocked():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
