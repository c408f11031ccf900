"""The INT4 GEMM at 16-64 rows in its two forms on a GPU: the tuner's choice (the swapped form, out^T = W^T x^T)
against the plain form (x as the MMA's first operand, 64-row tiles) over a few tiles and splits, launch-free
(a CUDA graph of calls over rotating weight copies), with each output's relative error against the float32
product of the same dequantized weights. 8B projection shapes, bf16, group 128 asymmetric.

    PYTHONPATH=. python bench/w4a16_gemm_forms.py > $OUT/w4a16_gemm_forms.txt
"""

from __future__ import annotations

import sys

PLAIN_TILES = ((128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 3), (256, 64, 8, 3), (128, 64, 8, 4), (64, 128, 4, 4),
               (256, 128, 8, 3))
"""(BLOCK_N, BLOCK_K, warps, stages) of the plain form, each at 1, 2 and 4 waves of split-K."""
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from terse.backend.local.quant.rtn import quantize_weight
    from terse.kernels.w4a16 import Plan, _gemm, _plan, run_plan
    from terse.kernels.w4a16_layout import Int4Weight, dequantize
    from terse.kernels.w4a16_timing import graph_ms, rotating_copies

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for m in (32, 16, 64):
        for name, (n, k) in SHAPES.items():
            if m != 32 and name in ("qkv", "o"):
                continue
            torch.manual_seed(0)
            w = quantize_weight(torch.randn(n, k, device=dev) / 64, 128, "asym", torch.bfloat16)
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            ref = x.float() @ dequantize(w, torch.float32)
            copies = [w] + [Int4Weight(w.qweight.clone(), w.scales.clone(), w.zeros.clone(), w.group_size)  # type: ignore[union-attr]
                            for _ in range(rotating_copies(w.nbytes(), dev, most=8) - 1)]
            plans = [("chosen", _plan(x, w, None))]
            plans += [("plain", _gemm(64, bn, bk, wp, st, w, m, sms, swap=False, waves=waves))
                      for bn, bk, wp, st in PLAIN_TILES for waves in (1, 2, 4)]
            unique: dict[Plan, str] = {}
            for label, plan in plans:
                unique.setdefault(plan, label)
            rows = []
            for plan, label in unique.items():
                out = run_plan(plan, x, w, None)
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                us = graph_ms([lambda c=c, p=plan, x=x: run_plan(p, x, c, None) for c in copies]) * 1e3
                rows.append((us, label, plan.describe(), err))
            rows.sort(key=lambda r: r[0])
            chosen = next(r for r in rows if r[1] == "chosen")
            print(f"== M={m} {name}: chosen {chosen[2]} {chosen[0]:.1f} us err {chosen[3]:.2e}", flush=True)
            for us, _, described, err in rows[:4]:
                print(f"   {us:8.1f} us  {described}  err {err:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
