"""Tolerances and the comparison of an engine's Result with the reference (pure functions).

fp32: every engine computes the same sums in a different order (all-reduce vs reduce-scatter, a
micro-batch mean of means vs one mean), so results agree to a few fp32 ulps, not bitwise:
rtol 1e-5 on losses, gradient norms and weights, with atol 1e-6 for weights and logits near zero.
The weight tolerance holds for learning rates up to about 1e-4: Adam's first steps are nearly
lr * sign(g), and where a gradient coordinate is near Adam's eps (1e-8) its rounding noise (~1e-10
on these models) becomes an update error of up to lr * noise / eps ~ lr * 1e-2. Larger learning
rates need a proportionally larger atol (check_equivalence.py --atol).

One slice of weights is left out of every comparison: the key third of each ``attn.c_attn.bias``.
Softmax over keys is invariant to adding the same q.b_k to every score, so its true gradient is
exactly zero and what backward computes is rounding noise; Adam divides that noise by its own RMS
and moves the bias by up to lr per step, differently in every engine. The bias changes no output,
which is why the logits comparison still covers it.

bf16: activations and weights carry 8 significant bits, so one rounding is a relative error of up
to 2^-8 (0.4%). Losses and gradient norms are means and norms over thousands of such numbers and
land well inside 2^-7 (two bf16 roundings: the weight cast and the activation) of the fp32
reference; that is the bf16 tolerance. Weights are not compared element by element in bf16: Adam
divides each gradient coordinate by its own running RMS, so a coordinate whose gradient is below
bf16's resolution can flip sign and move by 2 x lr, whatever the engine. For the same reason only the
first step's gradient norm is compared in bf16 (the one computed at the shared initial weights): later
norms are taken at weights that such flips moved, and at lr 1e-2 a tiny model's norm then differed by
1.6% at step 3 under DDP alone (ddp vs reference, world 1), twice the tolerance. Losses stay within
~2e-5 at every step and are compared throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2_scale.harness.run import Result


@dataclass(frozen=True)
class Tolerance:
    rtol: float  # losses, gradient norms (and weights, logits)
    atol: float  # weights and logits
    weights: bool = True  # compare weights and logits element by element

    @classmethod
    def for_dtype(cls, dtype: str) -> "Tolerance":
        return FP32 if dtype == "fp32" else BF16


FP32 = Tolerance(rtol=1e-5, atol=1e-6)
BF16 = Tolerance(rtol=2**-7, atol=0.0, weights=False)


def max_rel_diff(values: list[float], reference: list[float]) -> float:
    a, b = torch.tensor(values, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)
    return ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item()


def comparable(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights without the key bias, whose gradient is zero in exact arithmetic (see the module doc)."""
    out = dict(weights)
    for name, t in weights.items():
        if name.endswith("attn.c_attn.bias"):
            n = t.numel() // 3
            out[name] = torch.cat([t[:n], t[2 * n :]])  # query and value biases
    return out


def max_weight_diff(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over every comparable parameter (both must name the same parameters)."""
    if weights.keys() != reference.keys():
        raise ValueError(f"different parameters: {sorted(weights.keys() ^ reference.keys())[:5]}")
    weights, reference = comparable(weights), comparable(reference)
    return max((weights[k] - reference[k]).abs().max().item() for k in reference)


def _close(a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> bool:
    return torch.allclose(a, b, rtol=tol.rtol, atol=tol.atol)


def mismatches(result: Result, reference: Result, tol: Tolerance) -> list[str]:
    """What disagrees with the reference beyond ``tol``, one line each; empty when the engine agrees."""
    out = []
    if len(result.losses) != len(reference.losses):
        return [f"{len(result.losses)} steps, the reference has {len(reference.losses)}"]
    norms, ref_norms = (result.grad_norms, reference.grad_norms) if tol.weights else (result.grad_norms[:1], reference.grad_norms[:1])
    for name, values, ref in (("loss", result.losses, reference.losses), ("grad norm", norms, ref_norms)):
        if max_rel_diff(values, ref) > tol.rtol:
            out.append(f"{name} per step {values} vs reference {ref} (max rel diff {max_rel_diff(values, ref):.2e} > {tol.rtol:.1e})")
    if tol.weights:
        weights, expected = comparable(result.weights), comparable(reference.weights)
        bad = [k for k in expected if not _close(weights[k], expected[k], tol)]
        if bad:
            worst = max(bad, key=lambda k: (weights[k] - expected[k]).abs().max().item())
            diff = (weights[worst] - expected[worst]).abs().max().item()
            out.append(f"weights differ in {len(bad)} tensor(s), worst {worst}: max abs diff {diff:.2e}")
        if not _close(result.logits, reference.logits, tol):
            out.append(f"logits max abs diff {(result.logits - reference.logits).abs().max().item():.2e}")
    if result.exported_logits is not None and not _close(result.exported_logits, result.logits, FP32):
        diff = (result.exported_logits - result.logits).abs().max().item()
        out.append(f"logits after export and reload differ from the trained engine's by {diff:.2e}")
    return out


def format_table(reference: Result, results: dict[str, Result | str]) -> str:
    """Per-step loss of the reference and each engine, then each engine's worst differences.

    A str in ``results`` is an engine that failed to run; its row shows the reason.
    """
    steps = len(reference.losses)
    head = ["engine"] + [f"loss@{i}" for i in range(steps)] + ["max rel dloss", "max rel dnorm", "max |dparam|"]
    rows = [["reference"] + [f"{x:.6f}" for x in reference.losses] + ["", "", ""]]
    for engine, r in results.items():
        if isinstance(r, str):
            rows.append([engine] + ["-"] * steps + [r, "", ""])
            continue
        rows.append(
            [engine]
            + [f"{x:.6f}" for x in r.losses]
            + [f"{max_rel_diff(r.losses, reference.losses):.2e}", f"{max_rel_diff(r.grad_norms, reference.grad_norms):.2e}", f"{max_weight_diff(r.weights, reference.weights):.2e}"]
        )
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head] + rows)
