"""Property tests: DDP, FSDP2 and ZeRO-1/2/3 train the same model as one plain process.

Each example is a tiny GPT, a token batch, a split of that batch over micro-steps and ranks and
optimizer settings, all drawn by hypothesis; a failing example prints as ``Draw 1: Case(...)``,
whose ``seed`` fixes the weights and tokens, so the Case alone reproduces it. Engines run on
persistent gloo worker pools (world 1 and 2) started once for this module. What "the same" means
in fp32 (which quantities, to what tolerance, and why) is gpt2_scale/harness/compare.py's docstring.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2_scale.config import ENGINES
from gpt2_scale.harness.case import Case, rank_batches, tokens
from gpt2_scale.harness.compare import BF16, FP32, Tolerance, adam_slack, mismatches
from gpt2_scale.harness.pool import WorkerPool
from gpt2_scale.harness.run import Result, joined, record_adam_step, reference
from gpt2_scale.zoo import ModelConfig


@st.composite
def cases(draw, engine: str | None = None, min_steps: int = 1) -> Case:
    n_head = draw(st.integers(1, 4))
    n_embd = n_head * draw(st.sampled_from([4, 8, 16]))
    seq_len = draw(st.integers(8, 64))
    model = ModelConfig(
        draw(st.integers(1, 3)),
        n_head,
        n_embd,
        block_size=draw(st.integers(seq_len, 64)),  # positions beyond seq_len get no gradient at all
        vocab_size=draw(st.integers(2, 300)),  # mostly not divisible by the world size
        pad_vocab=draw(st.booleans()),
    )
    return Case(
        model,
        engine or draw(st.sampled_from(ENGINES)),
        world_size=draw(st.sampled_from([1, 2])),
        micro_batch=draw(st.integers(1, 4)),
        accum=draw(st.integers(1, 4)),
        seq_len=seq_len,
        steps=draw(st.integers(min_steps, 3)),
        lr=10 ** draw(st.floats(-5, -4)),  # where compare.py measured the lr^2 effect its weight bound leaves out
        grad_clip=draw(st.sampled_from([0.0, 0.1, 1.0])),  # 0.1 clips: gradient norms start near 0.5-1
        weight_decay=draw(st.sampled_from([0.0, 0.1])),
        seed=draw(st.integers(0, 2**16)),
    )


# Resumes move to 4 ranks too in the nightly profile (a pool starts only when a case needs it).
WORLDS = (1, 2, 4) if settings.default.max_examples > 10 else (1, 2)


@pytest.fixture(scope="module")
def pools():
    with WorkerPool(1) as one, WorkerPool(2) as two, WorkerPool(4) as four:
        yield {1: one, 2: two, 4: four}


def run(pools: dict[int, WorkerPool], case: Case) -> Result:
    return pools[case.world_size].run(case)


def assert_agrees(result: Result, expected: Result, tol=FP32) -> None:
    problems = mismatches(result, expected, tol)
    assert not problems, "\n".join(problems)


def as_expected(result: Result, case: Case) -> Result:
    """An engine's run as the yardstick for another run of the same total batch: the weight tolerance needs the
    record of Adam's steps that only the reference keeps (it depends on the total batch, not on its split)."""
    return dataclasses.replace(result, adam=reference(case).adam)


@pytest.mark.parametrize("engine", ENGINES)
@given(data=st.data())
def test_engine_matches_single_process_reference(pools, engine, data):
    case = data.draw(cases(engine))
    assert_agrees(run(pools, case), reference(case))


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=max(1, settings.default.max_examples // 3))  # a third of the profile's: 3 in ci
@given(data=st.data())
def test_fused_loss_matches_the_plain_reference(pools, engine, data):
    """engine.loss_chunk > 0 (chunks that divide the micro-batch's tokens or not, or exceed them) trains as the
    reference does with the full logits: ZeRO-3 must gather lm_head for its forward, FSDP2 hands it a bf16 weight."""
    case = data.draw(cases(engine)).replace(loss_chunk=data.draw(st.integers(1, 80)),
                                            dtype=data.draw(st.sampled_from(["fp32", "bf16"])))
    assert_agrees(run(pools, case), reference(case), Tolerance.for_dtype(case.dtype))


def test_a_gradient_near_adams_eps_is_no_disagreement(pools):
    """The draw that failed under a fixed weight atol of 1e-6 (compare.py): the fused loss sums lm_head's gradient in
    another order, a c_fc gradient of 9e-10 came out 1.15e-9 instead of 6.9e-10, and Adam moved that weight 3.9e-6
    further than the reference did."""
    model = ModelConfig(2, 4, 16, block_size=49, vocab_size=291)
    case = Case(model, "zero2", micro_batch=1, accum=4, seq_len=17, steps=1, lr=1e-4, grad_clip=0.0, weight_decay=0.0,
                seed=1327, loss_chunk=1)
    assert_agrees(run(pools, case), reference(case))


def test_adam_slack_bounds_what_gradient_errors_do_to_adamw():
    """compare.py's weight bound against torch's AdamW: gradients off by up to grad_rtol x their tensor's largest at
    every step move the weights by no more than adam_slack, however near Adam's eps a gradient is; and the slack is a
    small part of Adam's step wherever the gradient is not small next to its tensor's largest."""
    gen = torch.Generator().manual_seed(0)
    lr, n = 1e-4, 100_000
    magnitude = 10 ** (-10 * torch.rand(n, generator=gen))  # 1 down to 1e-10, past eps (1e-8)
    params = [torch.zeros(n, requires_grad=True) for _ in range(2)]
    optimizers = [torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1) for p in params]
    steps = {}
    optimizers[0].register_step_post_hook(lambda optimizer, *_: record_adam_step(optimizer, steps))
    for _ in range(3):
        sign = 2 * torch.randint(0, 2, (n,), generator=gen) - 1  # flips between steps: m and v disagree
        grad = magnitude * sign * torch.empty(n).uniform_(0.5, 1.5, generator=gen)
        error = FP32.grad_rtol * grad.abs().max() * torch.empty(n).uniform_(-1, 1, generator=gen)
        for p, optimizer, g in zip(params, optimizers, (grad, grad + error)):
            p.grad = g
            optimizer.step()
    slack = adam_slack(steps[params[0]], FP32.grad_rtol)
    assert ((params[1] - params[0]).abs() <= slack).all()
    assert (slack[magnitude > 0.1] < 0.02 * lr).all()  # gradients over 1/30 of the largest: under 2% of lr


def test_a_hundredth_of_an_adam_step_is_a_disagreement():
    """The weight bound is not vacuous: one weight with a sizeable gradient moved by 1% of lr fails the comparison."""
    case = Case(ModelConfig(1, 2, 8, block_size=16, vocab_size=50), "ddp", steps=2, lr=1e-4)
    expected = reference(case)
    name = "transformer.h.0.mlp.c_fc.weight"
    moved = expected.weights[name].clone()
    moved.view(-1)[expected.adam[name][-1].m.abs().argmax()] += 0.01 * case.lr
    assert not mismatches(expected, expected, FP32)
    assert mismatches(dataclasses.replace(expected, weights={**expected.weights, name: moved}), expected, FP32)


def splits(total: int, worlds: tuple[int, ...] = (1, 2)) -> list[tuple[int, int, int]]:
    """Every (micro_batch, accum, world_size) with accumulation 1-4 whose product is total."""
    return [(total // (a * w), a, w) for w in worlds for a in range(1, 5) if total % (a * w) == 0]


@given(data=st.data())
def test_the_same_total_batch_split_differently_gives_the_same_run(pools, data):
    case = data.draw(cases())
    total = data.draw(st.sampled_from([2, 4, 6, 8]))
    first, second = data.draw(st.lists(st.sampled_from(splits(total)), min_size=2, max_size=2, unique=True))
    other_engine = data.draw(st.sampled_from(ENGINES))
    case = case.replace(micro_batch=first[0], accum=first[1], world_size=first[2])
    a = run(pools, case)
    b = run(pools, case.replace(micro_batch=second[0], accum=second[1], world_size=second[2], engine=other_engine))
    assert_agrees(b, as_expected(a, case))


def resumed(pools, case: Case, stop_at: int, then: Case, run_dir: Path) -> Result:
    """``case`` trained to ``stop_at`` and checkpointed, then continued to the end as ``then`` (another engine, world
    size or split of the same total batch); the two parts' losses and norms, and the final weights and logits."""
    first = run(pools, case.replace(stop_at=stop_at, run_dir=str(run_dir)))
    return joined(first, run(pools, then.replace(resume=True, run_dir=str(run_dir))))


@st.composite
def moves(draw, engine: str | None = None, engine2: str | None = None) -> tuple[Case, int, Case]:
    """A run, the step it stops at, and the engine, world size and split it resumes under."""
    case = draw(cases(engine, min_steps=2))
    micro_batch, accum, world_size = draw(st.sampled_from(splits(case.total_sequences, WORLDS)))
    then = case.replace(engine=engine2 or draw(st.sampled_from(ENGINES)), micro_batch=micro_batch, accum=accum, world_size=world_size)
    return case, draw(st.integers(1, case.steps - 1)), then


@given(data=st.data())
def test_a_run_resumes_exactly_under_any_engine_world_size_and_split(pools, tmp_path_factory, data):
    case, stop_at, then = data.draw(moves())
    assert_agrees(resumed(pools, case, stop_at, then, tmp_path_factory.mktemp("run")), reference(case))


@pytest.mark.parametrize("fault", ["drop_adam_moments", "restart_data"])
@settings(max_examples=max(1, settings.default.max_examples // 5))  # 2 in ci
@given(data=st.data())
def test_the_resume_property_catches_a_planted_bug(pools, tmp_path_factory, fault, data):
    """The property is not vacuous: a resume that loses Adam's moments in the conversion, or starts the data
    over, fails it (here moving from ZeRO shards to a torch engine and back)."""
    case, stop_at, then = data.draw(moves(*data.draw(st.sampled_from([("zero2", "fsdp"), ("ddp", "zero3")]))))
    got = resumed(pools, case, stop_at, then.replace(fault=fault), tmp_path_factory.mktemp("run"))
    assert mismatches(got, reference(case), FP32), f"{fault} went unnoticed"


@given(data=st.data())
def test_a_checkpoint_exported_from_one_engine_loads_under_another(pools, data):
    case = data.draw(cases())
    case = case.replace(export_to=data.draw(st.sampled_from([e for e in ENGINES if e != case.engine])))
    result = run(pools, case)
    diff = (result.exported_logits - result.logits).abs().max().item()
    assert torch.allclose(result.exported_logits, result.logits, rtol=FP32.rtol, atol=FP32.atol), f"max abs diff {diff:.2e}"


@given(data=st.data())
def test_bf16_stays_within_bf16_resolution_of_the_fp32_reference(pools, data):
    case = data.draw(cases()).replace(dtype="bf16", lr=data.draw(st.sampled_from([1e-4, 1e-3, 1e-2])))
    assert_agrees(run(pools, case), reference(case), BF16)


@given(data=st.data())
def test_deterministic_runs_repeat_bitwise(pools, data):
    case = data.draw(cases()).replace(deterministic=True)
    a, b = run(pools, case), run(pools, case)
    assert a.losses == b.losses and a.grad_norms == b.grad_norms
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


def test_rank_batches_partition_each_step_exactly():
    case = Case(ModelConfig(1, 1, 4, block_size=8, vocab_size=11), "ddp", world_size=2, micro_batch=3, accum=2, seq_len=8)
    step = tokens(case)[0]
    rows = [x for rank in range(2) for x, _ in rank_batches(step, 3, 2, 2, rank)]
    got = torch.cat(rows)
    assert got.shape == (12, 8)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, step[:, :-1].tolist()))
    x, y = rank_batches(step, 3, 2, 2, 1)[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_tokens_depend_on_the_total_batch_not_its_split():
    model = ModelConfig(1, 1, 4, block_size=8, vocab_size=11)
    a = Case(model, "ddp", world_size=2, micro_batch=1, accum=2, seq_len=8)
    b = Case(model, "zero3", world_size=1, micro_batch=4, accum=1, seq_len=8)
    assert torch.equal(tokens(a), tokens(b))


def test_the_equivalence_tool_checks_a_run_moved_to_another_engine_and_world(tmp_path):
    """What a user runs on a cluster, here in a spawned CPU world: ZeRO-2 on 2 ranks, resumed as ZeRO-3 on 1."""
    from launch import run as launch

    args = ["--model", "gpt2-tiny", "--engines", "zero2", "--steps", "3", "--seq-len", "16", "--resume-at", "1"]
    proc = launch("tools/check_equivalence.py", args + ["--resume-as", "zero3", "--resume-world", "1"], launcher="python", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "zero2->zero3" in proc.stdout and "OK:" in proc.stdout
    bad = launch("tools/check_equivalence.py", args[:-2] + ["--resume-as", "zero3"], launcher="python")
    assert bad.returncode == 2 and "need --resume-at" in bad.stderr


def test_the_equivalence_tool_under_a_launcher_works_in_a_directory_of_its_own(tmp_path):
    """Under torchrun every check works in a new directory inside --workdir and removes it: a second check with a
    smaller --resume-at does not meet the first one's checkpoints, and what else --workdir holds stays."""
    from launch import REPO
    from launch import run as launch

    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "notes.txt").write_text("mine")
    args = ["--model", "gpt2-tiny", "--engines", "ddp", "--steps", "3", "--seq-len", "16", "--workdir", str(tmp_path)]
    for resume_at in ("2", "1"):
        proc = launch("tools/check_equivalence.py", args + ["--resume-at", resume_at], nproc=2, timeout=600)
        assert proc.returncode == 0 and "OK:" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["scratch", "scratch/notes.txt"]
    (tmp_path / "file").write_text("x")
    bad = launch("tools/check_equivalence.py", args[:-1] + [str(tmp_path / "file" / "wd")], nproc=2)
    assert bad.returncode != 0 and f"error: --workdir {tmp_path / 'file' / 'wd'}: Not a directory" in bad.stderr, bad.stderr[-3000:]
    assert "exitcode  : 2" in bad.stderr and f'File "{REPO}' not in bad.stderr  # no traceback of ours (torchrun prints its own)


def test_the_equivalence_tool_says_resume_at_needs_two_steps():
    from gpt2_scale.tools.check_equivalence import parse_args

    with pytest.raises(ValueError, match="--resume-at needs --steps >= 2 .*, got --steps 1$"):  # not "between 1 and 0"
        parse_args(["--steps", "1", "--resume-at", "1"])


@pytest.mark.parametrize("flag,value", [("--rtol", "nan"), ("--atol", "-1"), ("--grad-rtol", "inf"), ("--lr", "nan"), ("--lr", "0"),
                                        ("--grad-clip", "nan")])
def test_the_equivalence_tool_refuses_a_tolerance_or_setting_that_cannot_be_checked(flag, value, capsys):
    """A nan tolerance passes every comparison (``diff > nan`` is False): the check could never fail."""
    from gpt2_scale.tools.check_equivalence import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args([flag, value])
    assert e.value.code == 2 and f"argument {flag}: must be a finite number" in capsys.readouterr().err


def test_the_equivalence_tool_refuses_ranks_the_host_cannot_hold(monkeypatch, capsys):
    """gpt2-xl on 2 CPU ranks wants ~48 GiB: the kernel's OOM killer ended the tool (exit 137, no word) and took
    memory from everything else on the machine. The refusal names the need and what is available."""
    from gpt2_scale import memory
    from gpt2_scale.tools import check_equivalence

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 16 * memory.GiB)
    assert check_equivalence.main(["--model", "gpt2-xl", "--engines", "ddp", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 CPU ranks of gpt2-xl need about ") and "this host has 16.0 GiB available" in err
    check_equivalence.parse_args(["--model", "gpt2-tiny"])  # a small model is left to run
    monkeypatch.setattr(memory, "host_available_bytes", lambda: None)  # unknown: not refused
    check_equivalence.parse_args(["--model", "gpt2-xl"])
