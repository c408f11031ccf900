"""Programmatic dependent launch for the engine's Triton kernels (Hopper and newer GPUs).

A decode step at batch 1 is a chain of ~320 short dependent kernels; between two of them the GPU
drains the first grid, then launches and ramps up the second. Launched with programmatic dependent
launch, a kernel's programs may start while the kernel before it in the stream is still running:

    kernel A    |== A's programs ==================|
    kernel B        |launch, ramp| wait ........... |== B's work ==|
                                     ^ griddepcontrol.wait: A completed, its writes are visible

Every kernel here that takes `PDL` calls `wait_for_previous_kernel` first, before any load or store
(so it never reads what the previous kernel writes, nor overwrites what it still reads), and then lets
the next kernel launch, at once or, with `launch_next_kernel`, later (a product that another product
follows: programs waiting beside a running product slow it). A kernel completes only after its own
wait, so a kernel two or more launches back has completed too: the chain keeps stream order for
memory while the launches overlap. A kernel launched without the attribute (torch's, cuBLAS's) keeps
plain stream order on both sides.

`launch_options(tensor)` gives a launch's keyword arguments: `PDL` (the kernels' constexpr) and, where
the tensor's GPU has it, Triton's `launch_pdl`. CUDA graphs capture the attribute (programmatic edges).
`set_dependent_launch(False)` turns it off for every later launch (benchmarks compare both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from terse.kernels.checks import interpreting

try:  # griddepcontrol intrinsics (Triton 3.3 and newer)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAVE_GDC = True
except ImportError:  # pragma: no cover - older Triton: kernels launch plainly (PDL is always False)
    gdc_launch_dependents = gdc_wait = None
    _HAVE_GDC = False

MIN_CAPABILITY = (9, 0)
"""Programmatic dependent launch needs sm_90 (Hopper) or newer."""

_enabled = True
_SUPPORTED: dict[int, bool] = {}


def set_dependent_launch(enabled: bool) -> None:
    """Turn programmatic dependent launch on or off for every later launch (kernels already captured in
    a CUDA graph keep how they were launched)."""
    global _enabled
    _enabled = bool(enabled)


def dependent_launch_enabled(device: torch.device) -> bool:
    """True when kernels launched on `device` use programmatic dependent launch."""
    if not _enabled or not _HAVE_GDC or device.type != "cuda" or interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    supported = _SUPPORTED.get(index)
    if supported is None:
        supported = _SUPPORTED[index] = torch.cuda.get_device_capability(index) >= MIN_CAPABILITY
    return supported


def launch_options(t: torch.Tensor) -> dict[str, bool]:
    """Keyword arguments of a launch whose tensors are on t's device: {"PDL": False} when off, else
    {"PDL": True, "launch_pdl": True}."""
    if dependent_launch_enabled(t.device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr, LAUNCH_NEXT: tl.constexpr = True):
    # first statement of a kernel launched with `launch_options`: wait until the previous kernel in the
    # stream completed (its writes visible), then (LAUNCH_NEXT) let the next one launch
    if PDL:
        gdc_wait()
        if LAUNCH_NEXT:
            gdc_launch_dependents()


@triton.jit
def launch_next_kernel(PDL: tl.constexpr):
    # for a kernel that waited with LAUNCH_NEXT=False: let the next kernel launch from here on
    if PDL:
        gdc_launch_dependents()
