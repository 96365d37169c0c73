"""Every SSD Triton kernel compiles for sm_90 with the launch options it runs with (no GPU needed:
Triton's own ptxas), at Mamba-2's P = 64, N = 128, chunk 256, in bf16 and fp32, for the defaults and
the variants ``benchmarks/ssd.py --sweep`` times; none spills to local memory, and each program's
shared memory stays under 200 KB. Marked ``slow`` (about a minute on two cores).

``python tests/test_ssd_compile.py [--sweep]`` prints each kernel's registers, local memory (spills)
and shared memory instead (``--sweep``: for every sweep variant too).

Shapes: B batch, T time, H heads, P head width, N state, G groups.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile

import pytest

pytest.importorskip("triton", reason="Triton is not installed: nothing to compile")

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from seqblocks.ops._backend import interpreter_enabled  # noqa: E402

P, N, CH = 64, 128, 256
_HALF = {"x_ptr", "B_ptr", "C_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
_INTS = {"T", "H", "G", "P", "N", "Tp", "nc", "PN", "NSLOT", "HPP", "NSPLIT_CB"}
SHARED_LIMIT = 200 * 1024


def kernels():
    return importlib.import_module("seqblocks.ops.ssd.triton")


def jobs(dtype: str, o: dict, *, HAS_D: bool = True) -> list[tuple[str, object, dict, int, int | None]]:
    """(name, kernel, constexprs, num_warps, num_stages) of every kernel a call with options ``o`` launches."""
    import triton

    k = kernels()
    ieee = 1 if dtype == "fp32" else 0
    bn, bp = N, P
    com = dict(CH=CH, BN=bn, IEEE=ieee)
    out = []
    if o["state_fused"]:
        out.append(("_state_fused_fwd", k._state_fused_fwd, dict(com, BL=o["state_bl"], BP=o["state_bp"], HAS_H0=True),
                    o["state_warps"], o["state_stages"]))
    else:
        out += [("_chunk_state_fwd", k._chunk_state_fwd, dict(com, BL=o["state_bl"], BP=bp), o["state_warps"],
                 o["state_stages"]),
                ("_state_pass_fwd", k._state_pass_fwd, dict(CH=CH, BLOCK=o["pass_block"], HAS_H0=True),
                 o["pass_warps"], None)]
    if o["cb_shared"]:
        out.append(("_chunk_cb", k._chunk_cb, dict(com, BLK=o["cb_block"]), o["cb_warps"], o["cb_stages"]))
    shared = o["cb_shared"]
    out.append(("_chunk_scan_fwd", k._chunk_scan_fwd,
                dict(com, BL=o["scan_bl"], BS=o["scan_bs"], BP=o["scan_bp"], SHARED_CB=shared, HAS_D=HAS_D,
                     D_PER_P=False), o["scan_warps"], o["scan_stages"]))
    if o["dstate_fused"]:
        out.append(("_dstate_fused_bwd", k._dstate_fused_bwd,
                    dict(com, BL=o["dstate_bl"], BP=o["dstate_bp"], HAS_DFINAL=True), o["dstate_warps"],
                    o["dstate_stages"]))
    else:
        out += [("_chunk_dstate_bwd", k._chunk_dstate_bwd, dict(com, BL=o["dstate_bl"], BP=bp), o["dstate_warps"],
                 o["dstate_stages"]),
                ("_state_pass_bwd", k._state_pass_bwd, dict(CH=CH, BLOCK=o["pass_block"], HAS_DFINAL=True),
                 o["pass_warps"], None)]
    out += [("_chunk_bwd_dx", k._chunk_bwd_dx, dict(com, BS=o["dx_bs"], BL=o["dx_bl"], BP=bp, SHARED_CB=shared,
                                                    HAS_D=HAS_D, D_PER_P=False), o["dx_warps"], o["dx_stages"]),
            ("_chunk_bwd_dcb", k._chunk_bwd_dcb, dict(com, BLK=o["dcb_block"], BP=bp, SHARED_CB=shared, SLOT0=2),
             o["dcb_warps"], o["dcb_stages"]),
            ("_chunk_bwd_db", k._chunk_bwd_db, dict(com, BS=o["db_bs"], BL=o["db_bl"], BP=bp), o["db_warps"],
             o["db_stages"]),
            ("_chunk_bwd_dc", k._chunk_bwd_dc, dict(com, BL=o["dc_bl"], BS=o["dc_bs"], BP=bp, SLOT=1), o["dc_warps"],
             o["dc_stages"]),
            ("_dacs_finish", k._dacs_finish, dict(CH=CH, BSLOT=triton.next_power_of_2(3 + CH // o["dcb_block"])),
             o["finish_warps"], None)]
    return out


def compile_one(fn, consts: dict, dtype: str, warps: int, stages: int | None):
    from sm90 import compile_for_sm90

    half = "*fp32" if dtype == "fp32" else "*bf16"
    sig = {n: "i32" if n in _INTS else half if n in _HALF else "*fp32" for n in fn.arg_names if n not in consts}
    return compile_for_sm90(fn, sig, consts, warps, num_stages=stages)


def usage(dtype: str, o: dict, tmp: str) -> list[tuple[str, int, int | None, dict | None, int]]:
    """(name, warps, stages, cuobjdump's REG / LOCAL ..., dynamic shared bytes) of each kernel."""
    from sm90 import resource_usage

    rows = []
    for name, fn, consts, warps, stages in jobs(dtype, o):
        compiled = compile_one(fn, consts, dtype, warps, stages)
        rows.append((name, warps, stages, resource_usage(compiled, tmp), compiled.metadata.shared))
    return rows


def options(dtype: str, overrides: dict | None = None, H: int = 24, G: int = 1) -> dict:
    import torch

    return kernels().launch_options(torch.float32 if dtype == "fp32" else torch.bfloat16, P, N, H, G, CH, overrides)


if not interpreter_enabled():

    @pytest.mark.slow
    @pytest.mark.parametrize("dtype", ["bf16", "fp32"])
    @pytest.mark.parametrize("variant", ["default", "split", "private_cb"])
    def test_kernels_compile_for_sm90_without_spills(dtype, variant, tmp_path):
        """The defaults, the split state kernels and CB per kernel (the G = H default) all compile,
        use no local memory and stay under the shared-memory budget."""
        over = {"split": {"state_fused": False, "dstate_fused": False}, "private_cb": {"cb_shared": False},
                "default": {}}[variant]
        for name, _warps, _stages, res, shared in usage(dtype, options(dtype, over), str(tmp_path)):
            assert shared <= SHARED_LIMIT, (name, shared)
            # fp32 never takes per-kernel CB by default (launch_options), so its spills are allowed there
            if res is not None and not (dtype == "fp32" and variant == "private_cb"):
                assert res["LOCAL"] == 0 and res["STACK"] == 0, (name, res)

    @pytest.mark.slow
    def test_sweep_variants_compile_for_sm90(tmp_path):
        """Every variant ``benchmarks/ssd.py --sweep`` times compiles without spills (a bad one would cost
        the GPU run)."""
        import ssd as bench  # benchmarks/ssd.py
        from sm90 import resource_usage

        for kernel, over in bench.sweep_variants():
            for name, fn, consts, warps, stages in jobs("bf16", options("bf16", over)):
                if name in bench.SWEEP_KERNELS[kernel]:
                    compiled = compile_one(fn, consts, "bf16", warps, stages)
                    assert compiled.metadata.shared <= SHARED_LIMIT, (kernel, over, name, compiled.metadata.shared)
                    res = resource_usage(compiled, str(tmp_path))
                    assert res is None or (res["LOCAL"] == 0 and res["STACK"] == 0), (kernel, over, name, res)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="sm_90 resource use of the SSD kernels")
    p.add_argument("--sweep", action="store_true", help="also every variant of benchmarks/ssd.py --sweep")
    p.add_argument("--dtype", default="bf16,fp32")
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp()
    for dtype in args.dtype.split(","):
        for label, over in (("default", {}), ("split", {"state_fused": False, "dstate_fused": False}),
                            ("private_cb", {"cb_shared": False})):
            print(f"== {dtype} {label}")
            for name, warps, stages, res, shared in usage(dtype, options(dtype, over), tmp):
                print(f"  {name:20s} warps {warps} stages {stages} {res} shared {shared}")
    if args.sweep:
        import ssd as bench

        seen = set()
        for kernel, over in bench.sweep_variants():
            o = options("bf16", over)
            for name, fn, consts, warps, stages in jobs("bf16", o):
                key = (name, tuple(sorted(consts.items())), warps, stages)
                if name not in bench.SWEEP_KERNELS[kernel] or key in seen:
                    continue
                seen.add(key)
                from sm90 import resource_usage

                c = compile_one(fn, consts, "bf16", warps, stages)
                print(f"  sweep {kernel:7s} {over} {name:20s} {resource_usage(c, tmp)} shared {c.metadata.shared}")


if __name__ == "__main__":
    main()
