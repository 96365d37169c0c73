"""Ahead-of-time compilation of Triton kernels for sm_90 (no GPU needed), for the ``slow`` compile checks
of the kernel test files: Triton's compiler rejects code its interpreter lets through (a value whose type
changes under a runtime branch, layouts), and the cubin says how many registers and how much local
memory (spills) a kernel needs.
"""

from __future__ import annotations

import os
import re
import subprocess

import triton

__all__ = ["compile_for_sm90", "resource_usage"]


def compile_for_sm90(fn, signature: dict, constexprs: dict, num_warps: int, maxnreg: int | None = None,
                     num_stages: int | None = None):
    """Compile ``fn`` for sm_90 and return Triton's compiled kernel. Absent pointers (signature value
    None) are constexpr None, as at a real launch; pointers get the 16-byte alignment a launch
    specialises them with. ``num_stages`` None: Triton's default software pipelining."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(constexprs)
    full = {}
    for name, ty in signature.items():
        full[name] = "constexpr" if ty is None else ty
        if ty is None:
            consts[name] = None
    full.update({k: "constexpr" for k in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(full.values()) if t.startswith("*")}
    options = {"num_warps": num_warps, **({} if maxnreg is None else {"maxnreg": maxnreg}),
               **({} if num_stages is None else {"num_stages": num_stages})}
    return triton.compile(ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def resource_usage(kernel, tmp_path) -> dict[str, int] | None:
    """{"REG", "STACK", "SHARED", "LOCAL"} of a compiled kernel from the ``cuobjdump`` bundled with
    Triton's NVIDIA backend; None where that tool is absent."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    path = os.path.join(tmp_path, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return None if m is None else dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))
