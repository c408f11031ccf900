"""Programmatic dependent launch: when kernels use it, and what the Hopper build of a kernel does first.

The interpreter cannot run griddepcontrol, so the compiled order is checked in the PTX Triton builds for
sm_90 (no GPU needed: a subprocess with the interpreter off compiles for that target)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from terse.kernels import dependent_launch as dl
from terse.kernels.w4a16_gemv_column import prefetch_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gpu_of(monkeypatch: pytest.MonkeyPatch):
    """Pretend cuda:0 exists with the given compute capability (the interpreter off)."""

    def set_capability(capability: tuple[int, int]) -> None:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setattr(dl, "_SUPPORTED", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)

    yield set_capability
    dl.set_dependent_launch(True)


def test_cpu_tensors_and_the_interpreter_launch_plainly() -> None:
    assert dl.launch_options(torch.zeros(1)) == {"PDL": False}
    assert not dl.dependent_launch_enabled(torch.device("cuda", 0))  # the tests run under the interpreter


def test_hopper_launches_dependently_older_gpus_do_not(gpu_of) -> None:
    t = torch.empty(0, device="meta")
    assert dl.launch_options(t) == {"PDL": False}  # not CUDA
    gpu_of((9, 0))
    assert dl.dependent_launch_enabled(torch.device("cuda", 0))
    gpu_of((8, 0))
    assert not dl.dependent_launch_enabled(torch.device("cuda", 0))


def test_switching_off_reaches_every_later_launch(gpu_of) -> None:
    gpu_of((9, 0))
    dl.set_dependent_launch(False)
    assert not dl.dependent_launch_enabled(torch.device("cuda", 0))
    dl.set_dependent_launch(True)
    assert dl.dependent_launch_enabled(torch.device("cuda", 0))


@pytest.mark.parametrize(("grid", "block_n", "k_per_split", "want"), [
    ((192, 1), 32, 4096, 128),   # q/k/v: 4 MB / (192 programs x 128 B a row) = 170 -> 128 rows
    ((896, 1), 32, 4096, 32),    # gate/up: 4 MB / 896 / 128 = 36.6 -> 32
    ((2, 64), 128, 256, 32),     # split-K: 64 rows of budget, no more than a program's 256 / 8
    ((100000, 4), 128, 4096, 0),  # under a row a program: none
])
def test_prefetch_rows_share_the_budget(grid, block_n, k_per_split, want, monkeypatch: pytest.MonkeyPatch) -> None:
    from terse.kernels import w4a16_gemv_column

    monkeypatch.setattr(w4a16_gemv_column, "PREFETCH_BYTES", 4 << 20)
    assert prefetch_rows(grid, block_n, k_per_split) == want


_COMPILE = r"""
import json, sys, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from terse.kernels.norm import _add_rms_norm_kernel
from terse.kernels.w4a16_gemv_column import _w4a16_gemv_column_kernel
from terse.kernels.w4a16_qkv_rope import _w4a16_qkv_rope_kernel

def ptx(fn, sig, consts, warps):
    for name in consts:
        sig[name] = "constexpr"
    names = list(sig)
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    opts = {"num_warps": warps, "num_stages": 3, "launch_pdl": consts["PDL"]}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

column = {"X": "*bf16", "XP": "*fp32", "SP": "*fp32", "QW": "*i32", "S": "*bf16", "Z": "*bf16", "Bias": "*bf16",
          "Out": "*bf16", "WS": "*fp32", "Locks": "*i32", "OutXP": "*fp32", "OutSP": "*fp32", "N": "i32", "K": "i32",
          "K_PER_SPLIT": "i32", "split_k": "i32"}
norm = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
        "prep_x_ptr": "*fp32", "prep_sums_ptr": "*fp32", "stride_x": "i32", "stride_res": "i32", "stride_out": "i32", "stride_res_out": "i32", "N": "i32", "eps": "fp32"}
rope = {"X": "*bf16", "QW": "*i32", "S": "*bf16", "Z": "*bf16", "Bias": "*bf16", "COS": "*fp32", "SIN": "*fp32",
        "POS": "*i64", "SLOT": "*i64", "KV": "*bf16", "QOut": "*bf16", "KOut": "*bf16", "VOut": "*bf16", "N": "i32",
        "K": "i32", "stride_cos": "i32", "stride_plane": "i32", "stride_slot": "i32"}
out = {}
for pdl in (False, True):
    consts = dict(GROUP_SIZE=128, HAS_ZEROS=True, HAS_BIAS=False, BLOCK_N=32, GROUPS=2, USE_SPLIT=False, EVEN_N=True,
                  EVEN_K=True, NUM_STAGES=3, FAST=True, PDL=pdl, PREFETCH_ROWS=64 if pdl else 0, PAIRED=False,
                  LATE_LAUNCH=False, PREP_SPAN=0, PREP_OUT=False)
    out[f"column_{pdl}"] = ptx(_w4a16_gemv_column_kernel, dict(column), consts, 4)
    out[f"column-silu-mul_{pdl}"] = ptx(_w4a16_gemv_column_kernel, dict(column), dict(consts, PAIRED=True, LATE_LAUNCH=True), 4)
    out[f"column-prep-in-out_{pdl}"] = ptx(_w4a16_gemv_column_kernel, dict(column), dict(
        consts, PAIRED=True, LATE_LAUNCH=True, PREP_SPAN=128, PREP_OUT=True), 1)
    out[f"column-row-prep_{pdl}"] = ptx(_w4a16_gemv_column_kernel, dict(column), dict(consts, PREP_SPAN=8), 2)
    out[f"qkv-rope_{pdl}"] = ptx(_w4a16_qkv_rope_kernel, dict(rope), dict(
        GROUP_SIZE=128, HAS_ZEROS=True, HAS_BIAS=False, BLOCK_N=16, GROUPS=4, EVEN_K=True, NUM_STAGES=4, FAST=True,
        PDL=pdl, PREFETCH_ROWS=64 if pdl else 0, NUM_HEADS=32, NUM_KV_HEADS=8, HALF=64), 4)
    out[f"norm_{pdl}"] = ptx(_add_rms_norm_kernel, dict(norm), dict(HAS_RESIDUAL=True, BLOCK=4096, PDL=pdl, PREP_SPAN=0), 8)
    out[f"norm-prep_{pdl}"] = ptx(_add_rms_norm_kernel, dict(norm), dict(HAS_RESIDUAL=True, BLOCK=4096, PDL=pdl,
                                                                        PREP_SPAN=128), 8)
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def hopper_ptx() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"compiling for sm_90 failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def _first(ptx: str, needle: str) -> int:
    at = ptx.find(needle)
    assert at >= 0, f"{needle} not in the PTX"
    return at


def test_every_memory_access_comes_after_the_wait(hopper_ptx: dict[str, str]) -> None:
    for kernel in ("norm", "norm-prep", "column", "column-silu-mul", "column-prep-in-out", "column-row-prep", "qkv-rope"):
        ptx = hopper_ptx[f"{kernel}_True"]
        wait = _first(ptx, "griddepcontrol.wait")
        assert wait < _first(ptx, "griddepcontrol.launch_dependents")
        for access in ("ld.global", "st.global", "atom.global"):
            at = ptx.find(access)
            assert at < 0 or at > wait, f"{kernel}: {access} before griddepcontrol.wait"
        plain = hopper_ptx[f"{kernel}_False"]
        assert "griddepcontrol" not in plain and "prefetch" not in plain


def test_the_column_gemv_prefetches_its_weight_before_the_wait(hopper_ptx: dict[str, str]) -> None:
    for kernel in ("column", "column-silu-mul", "qkv-rope"):
        ptx = hopper_ptx[f"{kernel}_True"]
        assert _first(ptx, "prefetch.global.L2") < _first(ptx, "griddepcontrol.wait")
