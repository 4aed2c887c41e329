"""Tolerances and the comparison of an engine's Result with the reference (pure functions).

fp32: every engine computes the same sums in another order (all-reduce vs reduce-scatter, a mean of
micro-batch means vs one mean, the fused loss's chunks vs one matmul), so it agrees with the reference
to fp32 rounding, not bitwise. Each quantity is compared where that rounding has a known size:

- Losses and gradient norms, every step: rtol 1e-5. Both are taken before the optimizer acts.
- Weights, element by element: |w - w_ref| <= rtol * |w_ref| + adam_slack, how far AdamW can move
  the weight when every gradient element of every step is off by up to e = grad_rtol x the largest
  gradient of its tensor. A fixed atol (1e-6 before) fails correct engines in about 0.2% of draws,
  fused loss or plain alike: Adam divides each gradient element by its own RMS, so where a gradient is
  near eps (1e-8) a rounding difference becomes a visible step. In the draw that showed it, a c_fc
  gradient was 9.0e-10 in float64, 6.9e-10 in the reference and 1.15e-9 with the fused loss (each
  within 2.5e-10 of float64, 5e-8 x the tensor's largest gradient), and Adam stepped the weight by
  0.064 lr and 0.103 lr: 3.9e-6 apart at lr 1e-4.
  e is relative to the tensor's largest gradient, not to the element: an element is a sum over
  tokens that can cancel to almost nothing, while its rounding error stays the size of the terms.
  Between the whole-batch reference and splits of it over micro-batches, ranks and loss chunks it
  reached 6.5e-6 x the largest over 2,500 draws (LayerNorm gains and biases, sums over every token,
  the worst); grad_rtol 1e-4 leaves a factor 15 (the clipping factor adds the norm's 1e-5 at most).
  The slack: after bias correction Adam's m is a weighted mean of the step gradients and sqrt(v) a
  weighted RMS of them, so each moves by at most e, and the update m / D (D = sqrt(v) + eps) by at
  most e (D + |m|) / (D D'), with D' = max(eps, D - e) the smallest denominator the other run can
  have; summed over the steps times lr (weight decay only shrinks a difference). That is exact for
  any gradient errors up to e (a test checks it against torch's AdamW), small where a gradient is
  well above e (an element whose gradient is 1/30 of its tensor's largest gets under 1% of lr per
  step) and Adam's whole step where it is not: elements whose gradient is rounding noise, such as
  the key third of attn.c_attn.bias, whose gradient is zero in exact arithmetic (softmax over keys
  ignores a shift common to all keys). The price: what Adam does to gradients near eps (its eps
  itself) is not checked, because no two summation orders agree there. No atol: in a tensor with a
  gradient the slack is at least about grad_rtol x lr, which covers the rounding of the update; a
  tensor without one only decays, the same product in every engine. One effect is left out: a
  weight that moved differently changes the next step's gradients, by terms of order lr^2; at the
  drawn learning rates (up to 1e-4, 3 steps) the largest difference was 2% of its slack over 2,000
  draws.
- Logits of a fixed batch after training: the engine's own forward against the plain model's forward
  with the engine's final weights, rtol 1e-5 and atol 1e-6. That checks the engine's forward
  (gathers, casts) with nothing between the two; compared with the reference's logits instead, the
  weight differences above (each within its bound) moved logits by up to 4x atol in a correct run.

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

from gpt2_scale.harness.run import AdamStep, Result


@dataclass(frozen=True)
class Tolerance:
    rtol: float  # losses, gradient norms (and weights, logits)
    atol: float  # logits
    grad_rtol: float = 0.0  # gradient elements, as a fraction of their tensor's largest: what Adam may amplify
    weights: bool = True  # compare weights and logits element by element

    @classmethod
    def for_dtype(cls, dtype: str) -> Tolerance:
        return FP32 if dtype == "fp32" else BF16


FP32 = Tolerance(rtol=1e-5, atol=1e-6, grad_rtol=1e-4)
BF16 = Tolerance(rtol=2**-7, atol=0.0, weights=False)


def max_rel_diff(values: list[float], reference: list[float]) -> float:
    a, b = torch.tensor(values, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)
    return ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item()


def adam_slack(steps: list[AdamStep], grad_rtol: float) -> torch.Tensor:
    """How far AdamW can move a parameter's final weights when every gradient element of every step may be off by
    ``grad_rtol`` times the tensor's largest so far: the sum of lr * e * (D + |m|) / (D * D') (module doc)."""
    slack, error = torch.zeros(()), 0.0
    for s in steps:
        error = max(error, grad_rtol * s.max_grad)  # m and sqrt(v) average every step so far
        d_other = (s.d - error).clamp_min(s.eps)  # the smallest denominator the other run can have
        slack = slack + s.lr * error * (s.d + s.m.abs()) / (s.d * d_other)
    return slack


def weight_excess(weights: dict[str, torch.Tensor], expected: Result, tol: Tolerance) -> dict[str, float]:
    """Per parameter, the largest |w - w_expected| as a multiple of what ``tol`` allows there (<= 1 agrees).

    ``expected`` must carry the reference's optimizer record (``run.reference``) of the same total batch."""
    if weights.keys() != expected.weights.keys():
        raise ValueError(f"different parameters: {sorted(weights.keys() ^ expected.weights.keys())[:5]}")
    if expected.adam is None:
        raise ValueError("the expected Result has no record of Adam's steps: take it from run.reference")
    out = {}
    for name, want in expected.weights.items():
        allowed = tol.rtol * want.abs() + adam_slack(expected.adam[name], tol.grad_rtol)
        diff = (weights[name] - want).abs()
        out[name] = torch.where(diff > 0, diff / allowed, 0.0).max().item()  # 0/0: an exact match
    return out


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
        excess = weight_excess(result.weights, reference, tol)
        bad = [k for k, x in excess.items() if x > 1]
        if bad:
            worst = max(bad, key=excess.get)
            diff = (result.weights[worst] - reference.weights[worst]).abs().max().item()
            out.append(f"weights differ in {len(bad)} tensor(s), worst {worst}: max abs diff {diff:.2e}, {excess[worst]:.1f}x the tolerance")
        if not _close(result.logits, result.model_logits, tol):
            diff = (result.logits - result.model_logits).abs().max().item()
            out.append(f"logits differ from the plain model's with the engine's weights by {diff:.2e}")
    if result.exported_logits is not None and not _close(result.exported_logits, result.logits, FP32):
        diff = (result.exported_logits - result.logits).abs().max().item()
        out.append(f"logits after export and reload differ from the trained engine's by {diff:.2e}")
    return out


def format_table(reference: Result, results: dict[str, Result | str], tol: Tolerance) -> str:
    """Per-step loss of the reference and each engine, then each engine's worst differences (the weights'
    as a multiple of what ``tol`` allows, > 1 fails).

    A str in ``results`` is an engine that failed to run; its row shows the reason.
    """
    steps = len(reference.losses)
    head = ["engine"] + [f"loss@{i}" for i in range(steps)] + ["max rel dloss", "max rel dnorm", "max |dw| / tol"]
    rows = [["reference"] + [f"{x:.6f}" for x in reference.losses] + ["", "", ""]]
    for engine, r in results.items():
        if isinstance(r, str):
            rows.append([engine] + ["-"] * steps + [r, "", ""])
            continue
        weights = f"{max(weight_excess(r.weights, reference, tol).values()):.2e}" if tol.weights else "not compared"
        rows.append(
            [engine]
            + [f"{x:.6f}" for x in r.losses]
            + [f"{max_rel_diff(r.losses, reference.losses):.2e}", f"{max_rel_diff(r.grad_norms, reference.grad_norms):.2e}", weights]
        )
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head] + rows)
