"""Memory: the ZeRO accounting against what each engine's ranks hold, activation checkpointing under every
engine, the estimator's activation constants against saved-for-backward bytes measured here, and its predicted
peak against the peak of a whole training step under every engine, tracked allocation by allocation.

Two spawned worlds of 2 CPU ranks run every engine, one for the accounting, one for the peaks (DeepSpeed's
setup dominates the cost of both).
"""

import functools
import gc
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from launch import spawned_world

from gpt2_scale import memory
from gpt2_scale.model import GPT, Options
from gpt2_scale.zoo import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
# Many small tensors: ZeRO-1/2 keep whole gradients of the tensors that straddle a partition boundary and ZeRO-3
# keeps tensors under stage3_param_persistence_threshold unpartitioned, so the largest tensor (4·d² = 4096
# elements) must be small against Ψ/2 and against the threshold we set (0): then the accounting is exact to ~1%.
DEEP_NARROW = ModelConfig(n_layer=24, n_head=2, n_embd=32, block_size=32, vocab_size=256)
B, T = 2, 16
CONFIGS = (("fp32", False), ("bf16", False), ("fp32", True))  # (dtype, activation checkpointing)


def _config(engine: str, dtype: str, checkpointing: bool, tmp: str):
    from gpt2_scale.config import Config, EngineSection, ModelSection, TrainSection
    from gpt2_scale.engines.deepspeed import zero3_sharding_everything

    ds_config = str(zero3_sharding_everything(Path(tmp))) if engine == "zero3" else None
    return Config(
        model=ModelSection(name="gpt2-tiny", pad_vocab=False),
        train=TrainSection(micro_batch=B, seq_len=T, total_batch_tokens=B * T * 2 * 2),  # 2 ranks x 2 micro-steps
        engine=EngineSection(name=engine, dtype=dtype, compile=False, activation_checkpointing=checkpointing, ds_config=ds_config),
    )


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from gpt2_scale import distributed, engines
    from gpt2_scale.step import optimizer_step

    env = distributed.init("cpu")
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randint(0, 256, (B, T), generator=gen), torch.randint(0, 256, (B, T), generator=gen)) for _ in range(2)]
    results = {}
    for name in ENGINES:
        for dtype, checkpointing in CONFIGS:
            torch.manual_seed(0)
            model = GPT(DEEP_NARROW)
            engine = engines.build(_config(name, dtype, checkpointing, tmp), env)
            engine.setup(model)
            optimizer_step(engine, batches, 1e-3, env.device)  # Adam's state exists from the first step on
            saved: dict[int, int] = {}
            weights = {p.untyped_storage().data_ptr() for p in engine.module.parameters() if name in ("zero1", "zero2")}

            def pack(t, weights=weights, saved=saved):  # activations only: ZeRO-1/2's parameters are views of one flat buffer
                if not isinstance(t, torch.nn.Parameter) and t.untyped_storage().data_ptr() not in weights:
                    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            # Count what the first micro-step's forward saves: backward runs outside the hooks, so the blocks that
            # checkpointing recomputes there are not counted again.
            hooks, backward = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), engine._backward

            def backward_outside_hooks(loss, hooks=hooks, engine=engine, backward=backward):
                hooks.__exit__(None, None, None)
                del engine._backward
                backward(loss)

            hooks.__enter__()
            engine._backward = backward_outside_hooks
            state = memory.measure_state_bytes(engine, functools.partial(optimizer_step, engine, batches, 1e-3, env.device))
            weights = {k: v.clone() for k, v in engine.full_state_dict().items()}
            results[name, dtype, checkpointing] = (state, sum(saved.values()), weights)
            del engine, model
            gc.collect()  # drop this engine's hooks and buffers on every rank before the next one starts
            distributed.barrier()
    _finish(rank, tmp, results)


def _finish(rank: int, tmp: str, results: dict) -> None:
    """The end of a spawned world's worker: rank 0's results for ``spawned_world``, the process group closed."""
    from gpt2_scale import distributed

    if rank == 0:
        torch.save(results, os.path.join(tmp, "results.pt"))
    distributed.shutdown()


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return spawned_world(_worker, 2, tmp_path_factory.mktemp("world2"))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_model_state_bytes_match_the_zero_accounting(world2, engine, dtype):
    measured = world2[engine, dtype, False][0]
    expected = memory.expected_state_bytes(DEEP_NARROW.num_params(), engine, 2, bf16=dtype == "bf16", at_update=True)
    for part in ("params", "grads", "optimizer"):
        got, want = getattr(measured, part), getattr(expected, part)
        assert abs(got - want) <= 0.05 * want, f"{engine} {dtype} {part}: measured {got:,} B, accounting {want:,} B"


@pytest.mark.parametrize("engine", ENGINES)
def test_activation_checkpointing_saves_less_and_trains_the_same(world2, engine):
    _, saved_plain, weights_plain = world2[engine, "fp32", False]
    _, saved_ckpt, weights_ckpt = world2[engine, "fp32", True]
    assert saved_ckpt < 0.25 * saved_plain, f"{engine}: {saved_ckpt:,} B saved with checkpointing, {saved_plain:,} B without"
    for name, w in weights_plain.items():  # two steps from the same start: recomputation changes nothing
        torch.testing.assert_close(weights_ckpt[name], w, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{engine} {name}: {m}")


def _saved_block_bytes(mode: str, checkpointing: bool, n_layer: int, batch: int = 8, seq: int = 256, d: int = 128,
                       loss_chunk: int = 0) -> int:
    """Bytes of the tensors a forward saves for backward, parameters and views of them included (so the per-layer
    constant of the weights appears too: subtract it out by varying the batch)."""
    model = GPT(ModelConfig(n_layer=n_layer, n_head=4, n_embd=d, block_size=seq, vocab_size=128),
                Options(activation_checkpointing=checkpointing, loss_chunk=loss_chunk))
    if mode == "bf16":  # FSDP2's and DeepSpeed's bf16: the weights themselves are bf16
        model = model.to(torch.bfloat16)
    saved: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, 128, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=mode == "autocast"):
        model(idx, idx)
    return sum(saved.values())


@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16"])
def test_activation_constants_are_what_a_block_saves(mode):
    """The per-block bytes the estimator uses = the growth of saved bytes from 1 to 3 layers, per B·T·d, taken
    between two batch sizes so that what a layer saves regardless of the batch (weights, autocast's copies of
    them: memory.weight_copy_bytes) drops out."""
    def per_layer_per_token(checkpointing: bool) -> float:
        per_layer = {b: (_saved_block_bytes(mode, checkpointing, 3, b) - _saved_block_bytes(mode, checkpointing, 1, b)) / 2
                     for b in (4, 8)}
        return (per_layer[8] - per_layer[4]) / (4 * 256 * 128)

    assert per_layer_per_token(False) == pytest.approx(memory.BLOCK_BYTES[mode], rel=0.05)
    assert per_layer_per_token(True) == pytest.approx(memory.CHECKPOINTED_BLOCK_BYTES[mode], rel=0.05)


def test_a_fused_loss_chunk_saves_no_log_softmax():
    """With engine.loss_chunk the model saves grad_h (in place of lm_head's input) and the V·d weight gradient,
    not the B·T·V fp32 log-softmax."""
    B, T, V, d = 8, 256, 128, 128
    plain, fused = _saved_block_bytes("fp32", False, 1), _saved_block_bytes("fp32", False, 1, loss_chunk=300)
    assert plain - fused >= B * T * V * 4 - V * d * 4, f"{fused:,} B saved with the fused loss, {plain:,} B without"


# A model where activations, the loss and the weights all weigh in the peak (the update is never the largest moment:
# on CPU AdamW's foreach temporaries would add to it, which fused AdamW and DeepSpeed's FusedAdam on a GPU do not).
WIDE = ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=8192)
WIDE_BATCH = 4
# (engine, dtype, activation checkpointing, DeepSpeed's reduce_bucket_size: a few MiB, counted but not the whole
# peak, or None for the shipped JSON's, whose buckets make backward's first gradients the largest moment,
# micro-batches per step: with 2 every engine's gradients live through the second forward)
SETTINGS = (("bf16", False, 2_000_000, 1), ("fp32", False, 2_000_000, 1), ("bf16", True, 2_000_000, 1), ("bf16", False, None, 2))
PEAK_CASES = [(e, *settings) for e in ENGINES for settings in SETTINGS]
PEAK_CASES += [("zero1", "bf16", False, None, 1), ("zero2", "bf16", False, None, 1)]


def _ds_config(engine: str, bucket: int | None) -> dict | None:
    if not engine.startswith("zero"):
        return None
    from gpt2_scale.engines.deepspeed import DS_CONFIG_DIR

    ds = json.loads((DS_CONFIG_DIR / f"{engine}.json").read_text())
    if bucket:
        ds["zero_optimization"]["reduce_bucket_size"] = bucket
    return ds


def _peak_worker(rank: int, port: int, tmp: str) -> None:
    """The tracked peak of the first two training steps (setup included) of every case, the larger of 2 ranks'."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from torch.distributed._tools.mem_tracker import MemTracker

    from gpt2_scale import distributed, engines
    from gpt2_scale.config import Config, EngineSection, ModelSection, TrainSection
    from gpt2_scale.step import optimizer_step

    env = distributed.init("cpu")
    B, T, V = WIDE_BATCH, WIDE.block_size, WIDE.vocab_size
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randint(0, V, (B, T), generator=gen), torch.randint(0, V, (B, T), generator=gen)) for _ in range(2)]
    results = {}
    for case in PEAK_CASES:
        name, dtype, checkpointing, bucket, accumulation = case
        ds_path = None
        if name.startswith("zero"):
            ds_path = Path(tmp) / f"{name}-{bucket}-rank{rank}.json"
            ds_path.write_text(json.dumps(_ds_config(name, bucket)))
        cfg = Config(model=ModelSection(name="gpt2-tiny", pad_vocab=False),
                     train=TrainSection(micro_batch=B, seq_len=T, total_batch_tokens=B * T * accumulation * 2),
                     engine=EngineSection(name=name, dtype=dtype, compile=False, activation_checkpointing=checkpointing,
                                          ds_config=str(ds_path) if ds_path else None))
        tracker = MemTracker()
        with tracker:  # from before the model exists, so that every buffer an engine allocates is seen
            torch.manual_seed(0)
            engine = engines.build(cfg, env)
            engine.setup(GPT(WIDE))
            micro_step = engine.micro_step

            def tracked_micro_step(*args, micro_step=micro_step, tracker=tracker, **kwargs):
                loss = micro_step(*args, **kwargs)
                tracker.reset_mod_stats()  # MemTracker follows one call of each module per reset
                return loss

            engine.micro_step = tracked_micro_step
            for _ in range(2):  # the second step holds Adam's state through forward and backward
                optimizer_step(engine, batches[:accumulation], 1e-3, env.device)
        peak = torch.tensor(tracker.get_tracker_snapshot("peak")[env.device]["Total"], dtype=torch.float64)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        results[case] = int(peak.item())
        engine.close()
        del engine, tracker
        gc.collect()
    _finish(rank, tmp, results)


@pytest.fixture(scope="module")
def peaks(tmp_path_factory):
    return spawned_world(_peak_worker, 2, tmp_path_factory.mktemp("peaks"))


@pytest.mark.parametrize("case", PEAK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_the_estimate_is_the_peak_of_a_training_step(peaks, case):
    """Every byte a step allocates, tracked on CPU (torch's MemTracker), against the estimator's largest moment."""
    engine, dtype, checkpointing, bucket, accumulation = case
    est = memory.estimate(WIDE, engine, 2, WIDE_BATCH, WIDE.block_size, bf16=dtype == "bf16", checkpointing=checkpointing,
                          accumulation=accumulation, ds_config=_ds_config(engine, bucket))
    phases = {k: f"{v / 2**20:.1f}" for k, v in est.phases.items()}
    assert peaks[case] == pytest.approx(est.total, rel=0.08), f"measured {peaks[case] / 2**20:.1f} MiB; estimated (MiB) {phases}"


def test_the_estimate_is_its_largest_moment():
    xl = ModelConfig.from_name("gpt2-xl")
    plain = memory.estimate(xl, "zero3", 8, 16, 1024)
    ckpt = memory.estimate(xl, "zero3", 8, 16, 1024, checkpointing=True)
    assert plain.states.total == 16 * xl.num_params() // 8
    assert ckpt.activations < plain.activations / 5 and ckpt.loss == plain.loss
    assert plain.total == max(plain.phases.values()) == plain.phases["backward"]
    assert memory.estimate(xl, "ddp", 8, 16, 1024).states.total == 8 * plain.states.total


def test_what_lives_through_forward():
    """DDP's gradients (views of its buckets) and autocast's weight copies; the others' gradients only while
    accumulating; the copies are not saved for backward when the blocks are recomputed."""
    m = ModelConfig.from_name("gpt2-124m")
    psi = m.num_params()
    ddp, fsdp = memory.estimate(m, "ddp", 1, 8, 1024), memory.estimate(m, "fsdp", 1, 8, 1024)
    assert ddp.held_grads == 4 * psi and fsdp.held_grads == 0
    assert memory.estimate(m, "fsdp", 8, 8, 1024, accumulation=4).held_grads == 4 * psi  # whole until the reduce-scatter
    assert memory.estimate(m, "zero2", 8, 8, 1024, accumulation=4).held_grads == 2 * psi // 8
    assert ddp.weight_copies == (2 * psi, 2 * psi) and ddp.activations > fsdp.activations  # fp32 residual stream
    assert memory.estimate(m, "ddp", 1, 8, 1024, checkpointing=True).weight_copies == (2 * psi, 2 * m.vocab_size * m.n_embd)
    assert memory.estimate(m, "ddp", 1, 8, 1024, bf16=False).weight_copies == (0, 0)


def test_deepspeed_buckets_follow_its_config():
    m = ModelConfig.from_name("gpt2-124m")
    ds = {"zero_optimization": {"reduce_bucket_size": 1000, "overlap_comm": True}}
    assert memory.estimate(m, "zero1", 1, 8, 1024, ds_config=ds).buckets == (0, 2000)
    assert memory.estimate(m, "zero2", 1, 8, 1024, ds_config=ds).buckets == (0, 4000)
    assert memory.estimate(m, "zero1", 1, 8, 1024, ds_config=ds, accumulation=2).buckets == (2000, 0)  # kept between micro-batches
    assert memory.estimate(m, "zero3", 1, 8, 1024, ds_config=ds, bf16=False).buckets == (4000, 0)
    assert memory.estimate(m, "zero1", 1, 8, 1024).buckets == (0, memory.DS_REDUCE_BUCKET_SIZE * 2)  # DeepSpeed's default
    assert memory.estimate(m, "ddp", 1, 8, 1024, ds_config=ds).buckets == (0, 0)


def test_estimate_with_a_fused_loss_chunk():
    """engine.loss_chunk: one chunk's logits (c·V·CHUNK_BYTES) plus the V·d fp32 weight-gradient accumulator."""
    m = ModelConfig.from_name("gpt2-124m")
    plain = memory.estimate(m, "ddp", 1, 16, 1024)
    fused = memory.estimate(m, "ddp", 1, 16, 1024, loss_chunk=2048)
    chunk = 2048 * m.vocab_size * memory.CHUNK_BYTES["autocast"] + m.vocab_size * m.n_embd * 4
    assert fused.loss == (chunk, chunk)
    assert fused.loss[1] < plain.loss[1] / 6 and fused.activations == plain.activations and fused.states == plain.states
    whole = memory.estimate(m, "ddp", 1, 2, 64, loss_chunk=10**6)  # a chunk beyond B·T holds B·T tokens
    assert whole.loss[0] == memory.loss_bytes(m, 2, 64, "autocast")[0] + m.vocab_size * m.n_embd * 4


@given(fixed=st.integers(0, 1000), per_sample=st.integers(1, 100), budget=st.integers(0, 10**5),
       limit=st.none() | st.integers(1, 512))
@example(fixed=0, per_sample=1, budget=100, limit=4)  # the limit binds, itself a power of two: 4
@example(fixed=0, per_sample=1, budget=64, limit=None)  # the budget binds, exactly: 64
@example(fixed=5, per_sample=1, budget=5, limit=None)  # not even 1: 0
def test_the_largest_micro_batch_is_the_last_power_of_two_that_fits(fixed, per_sample, budget, limit):
    def peak(b: int) -> int:
        return fixed + per_sample * b

    fits = memory.largest_micro_batch(peak, budget, limit)
    if fits == 0:
        assert peak(1) > budget
    else:
        assert fits & (fits - 1) == 0 and peak(fits) <= budget and (limit is None or fits <= limit)
        assert peak(2 * fits) > budget or (limit is not None and 2 * fits > limit)


def test_a_micro_batch_too_large_for_the_gpu_gets_a_warning_naming_one_that_fits():
    """What the trainer prints on a GPU (Engine.memory_report, the estimate of the engine's own settings): nothing
    more where the estimate fits; the largest power of two that fits where one does; the settings that shrink a
    step where none does."""
    from gpt2_scale import engines
    from gpt2_scale.config import Config, EngineSection, ModelSection, TrainSection
    from gpt2_scale.distributed import DistEnv

    def report(engine: str, micro_batch: int, gib: float, **options) -> str:
        cfg = Config(model=ModelSection(name="gpt2-xl"), engine=EngineSection(name=engine, dtype="bf16", **options),
                     train=TrainSection(micro_batch=micro_batch, seq_len=1024, total_batch_tokens=64 * 1024))
        return engines.build(cfg, DistEnv(0, 0, 1, torch.device("cpu"))).memory_report(int(gib * memory.GiB))

    xl = ModelConfig.from_name("gpt2-xl", pad_vocab=True)  # as the trainer builds it
    peak = memory.estimate(xl, "ddp", 1, 64, 1024, checkpointing=True).total
    fits = report("ddp", 64, peak / memory.GiB + 2.01, activation_checkpointing=True)
    assert fits == f"estimated peak memory per rank: {peak / memory.GiB:.2f} GiB (the terms: tools/estimate_memory.py)"
    over = report("ddp", 64, 79.6, activation_checkpointing=True).splitlines()
    assert over[0] == fits and "exceeds this GPU's 79.6 GiB less 2 GiB reserved: expect an out-of-memory error" in over[1]
    smaller = memory.estimate(xl, "ddp", 1, 32, 1024, checkpointing=True, accumulation=2).total
    assert smaller < 77.6 * memory.GiB < memory.estimate(xl, "ddp", 1, 64, 1024, checkpointing=True, accumulation=1).total
    assert "--train.micro_batch=32 " in over[1]
    compiled = memory.estimate(xl, "ddp", 1, 64, 1024, checkpointing=True, compiled=True).total
    assert f"{compiled / memory.GiB:.2f} GiB" in report("ddp", 64, 200, activation_checkpointing=True, compile=True)
    none = report("fsdp", 8, 20).splitlines()[1]
    assert "--train.micro_batch" not in none and "--engine.activation_checkpointing=true" in none, none


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_compiled_loss_holds_the_logits_and_their_gradient_only(dtype):
    """COMPILED_LOSS_BYTES: compiled, the loss saves nothing B·T·V wide besides the logits it reads (eager: their
    fp32 log-softmax too), and backward writes the logits' gradient in their dtype, padding columns included."""
    from gpt2_scale.loss import cross_entropy

    tokens, padded, vocab = 512, 320, 300
    logits = torch.randn(tokens, padded, dtype=dtype, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.compile(cross_entropy)(logits, torch.randint(0, vocab, (tokens,)), vocab)
    loss.backward()
    saved.pop(logits.untyped_storage().data_ptr(), None)
    per_logit = logits.element_size()
    assert sum(saved.values()) < 0.1 * tokens * padded, saved  # per token only: the targets, a max and a logsumexp
    assert logits.grad.dtype == dtype and logits.grad.shape == logits.shape
    mode = "bf16" if dtype == torch.bfloat16 else "fp32"
    assert memory.COMPILED_LOSS_BYTES[mode] == (per_logit, 2 * per_logit)


def test_the_estimate_of_a_compiled_run():
    """Compiled (torch.compile, CUDA's default): the loss terms shrink to COMPILED_LOSS_BYTES, nothing else changes.
    Against the H200's compiled gpt2-124m rows at B=64 and the H100's ZeRO-3 rows (docs/benchmarks.md) it is within
    5%; the eager estimate is 0.61 of ddp's."""
    m = ModelConfig.from_name("gpt2-124m", pad_vocab=True)
    logits = 64 * 1024 * m.vocab_size
    eager, compiled = memory.estimate(m, "ddp", 1, 64, 1024), memory.estimate(m, "ddp", 1, 64, 1024, compiled=True)
    assert compiled.loss == (2 * logits, 4 * logits) and eager.loss == (10 * logits, 12 * logits)
    assert (compiled.states, compiled.activations, compiled.weight_copies) == (eager.states, eager.activations, eager.weight_copies)
    h200 = {"ddp": 36.0, "fsdp": 33.0, "zero1": 33.1, "zero2": 33.1}  # GiB measured, compiled blocks and loss
    for engine, measured in h200.items():
        assert measured / (memory.estimate(m, engine, 1, 64, 1024, compiled=True).total / memory.GiB) == pytest.approx(1.0, abs=0.05)
    # ZeRO-3 on an H100 (2026-11-27), MiB allocated at peak: its CUDA default (the loss compiled, the blocks eager) and eager
    from gpt2_scale.engines.deepspeed import DS_CONFIG_DIR

    zero3 = json.loads((DS_CONFIG_DIR / "zero3.json").read_text())
    for compiled_, measured in ((True, 33_310.6), (False, 58_426.6)):
        est = memory.estimate(m, "zero3", 1, 64, 1024, compiled=compiled_, ds_config=zero3)
        assert measured / (est.total / 2**20) == pytest.approx(1.0, abs=0.05)
    assert memory.estimate(m, "ddp", 1, 64, 1024, loss_chunk=4096, compiled=True).loss == \
        memory.estimate(m, "ddp", 1, 64, 1024, loss_chunk=4096).loss  # the fused chunked loss: its own terms


def _tool(capsys, *args: str) -> subprocess.CompletedProcess:
    """tools/estimate_memory.py, run in this process (tests/test_package.py runs the installed script)."""
    from gpt2_scale.tools.estimate_memory import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_estimate_memory_tool(tmp_path, capsys):
    out = _tool(capsys, "--model", "gpt2-xl", "--engine", "zero3", "--world", "8", "--micro-batch", "16", "--seq-len", "1024",
                "--activation-checkpointing")
    assert out.returncode == 0, out.stderr
    from gpt2_scale.engines.deepspeed import DS_CONFIG_DIR

    shipped = json.loads((DS_CONFIG_DIR / "zero3.json").read_text())
    est = memory.estimate(ModelConfig.from_name("gpt2-xl"), "zero3", 8, 16, 1024, checkpointing=True, ds_config=shipped)
    assert f"{est.total / memory.GiB:.2f} GiB" in out.stdout and "12Ψ/N" in out.stdout
    bad = _tool(capsys, "--model", "gpt2-xxl", "--engine", "zero3")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "gpt2-xl" in bad.stderr
    fused = _tool(capsys, "--model", "gpt2-xl", "--micro-batch", "16", "--loss-chunk", "4096")
    est = memory.estimate(ModelConfig.from_name("gpt2-xl"), "ddp", 1, 16, 1024, loss_chunk=4096)
    assert fused.returncode == 0 and "c·V·10 + V·d·4" in fused.stdout and f"{est.loss[0] / memory.GiB:.2f} GiB" in fused.stdout
    bad = _tool(capsys, "--loss-chunk", "-1")
    assert bad.returncode == 2 and "argument --loss-chunk: must be >= 0" in bad.stderr
    compiled = _tool(capsys, "--model", "gpt2-124m", "--micro-batch", "64", "--compile")
    est = memory.estimate(ModelConfig.from_name("gpt2-124m", pad_vocab=True), "ddp", 1, 64, 1024, compiled=True)
    assert compiled.returncode == 0 and ", compiled" in compiled.stdout and "B·T·V·2 / 4" in compiled.stdout
    assert f"{est.total / memory.GiB:.2f} GiB" in compiled.stdout
    accumulating = _tool(capsys, "--engine", "fsdp", "--accumulation", "4")
    assert accumulating.returncode == 0 and "live through forward" in accumulating.stdout
    for text in ("{", "[]"):
        (tmp_path / "ds.json").write_text(text)
        bad = _tool(capsys, "--engine", "zero2", "--ds-config", str(tmp_path / "ds.json"))
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "ds.json" in bad.stderr


def test_estimate_memory_tool_counts_zero2s_buckets_for_its_world(capsys):
    """The shipped ZeRO-2 JSON overlaps communication ("auto") across ranks only: two buckets then, one for one rank."""
    m = ModelConfig.from_name("gpt2-124m", pad_vocab=True)
    for world, overlap in ((1, False), (2, True)):
        out = _tool(capsys, "--model", "gpt2-124m", "--engine", "zero2", "--world", str(world), "--micro-batch", "8")
        ds = {"zero_optimization": {"reduce_bucket_size": 50_000_000, "overlap_comm": overlap}}
        est = memory.estimate(m, "zero2", world, 8, 1024, ds_config=ds)
        assert out.returncode == 0 and f"{est.total / memory.GiB:.2f} GiB" in out.stdout, out.stdout
        assert f"{sum(est.buckets) / memory.GiB:.2f} GiB   DeepSpeed's gradient buckets" in out.stdout


def test_estimate_memory_fits_the_largest_micro_batch_to_a_gpu(capsys):
    """--fit GIB: the largest power of two whose estimate fits GIB less --reserve, in the first line (tools/gpu_session.sh
    reads it) and then its terms; nothing fits: one line of what to change, exit 1."""
    xl = ModelConfig.from_name("gpt2-xl")
    for gib, reserve in ((79.6, 2.0), (139.8, 2.0), (79.6, 30.0)):
        out = _tool(capsys, "--model", "gpt2-xl", "--engine", "fsdp", "--activation-checkpointing", "--fit", str(gib),
                    "--reserve", str(reserve))
        assert out.returncode == 0, out.stderr
        fits = int(re.match(r"micro-batch (\d+): ", out.stdout).group(1))
        peak = lambda b: memory.estimate(xl, "fsdp", 1, b, 1024, checkpointing=True).total  # noqa: E731
        assert peak(fits) <= (gib - reserve) * memory.GiB < peak(2 * fits), (gib, reserve, fits)
        assert f"B = {fits}, T = 1024" in out.stdout and f"{2 * fits} would need {peak(2 * fits) / memory.GiB:.2f} GiB" in out.stdout
    none = _tool(capsys, "--model", "gpt2-xl", "--fit", "20")
    assert none.returncode == 1 and none.stdout == "" and none.stderr.startswith("error: no micro-batch fits: even 1 needs ")
    for args, message in ((["--fit", "80", "--micro-batch", "4"], "give --micro-batch or --fit, not both"),
                          (["--fit", "nan"], "argument --fit: must be a size in GiB >= 0, got nan"),
                          (["--fit", "1e300"], "argument --fit: must be a size in GiB >= 0, got 1e300"),  # no byte count
                          (["--fit", "80", "--reserve", "-1"], "argument --reserve: must be a size in GiB >= 0"),
                          (["--reserve", "3"], "--reserve goes with --fit"),  # else silently ignored
                          (["--fit", "80", "--reserve", "100"], "--reserve (100 GiB) leaves nothing of --fit (80 GiB)"),
                          (["--engine", "zero1", "--ds-config", "/"], "DeepSpeed config / is a directory, not a JSON file"),
                          (["--engine", "fsdp", "--ds-config", "x.json"], "--ds-config goes with a zero engine")):
        bad = _tool(capsys, *args)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def test_the_recipes_quote_the_estimator(capsys):
    """Each size recipe's docstring states its per-GPU estimate and the command that prints it: they must agree."""
    from gpt2_scale.tools.estimate_memory import main

    quotes = []
    for recipe in sorted(Path(ROOT, "recipes").glob("*.py")):
        text = " ".join(recipe.read_text().split())  # docstrings wrap lines
        quotes += [(recipe.name, *m) for m in re.findall(r"([\d.]+) GiB[^(:]*[(:] ?(?:python )?tools/estimate_memory\.py ([^)]*)\)", text)]
    assert len(quotes) >= 8, quotes
    for name, gib, args in quotes:
        assert main(args.split()) == 0
        peak = re.search(r"peak\s+([\d.]+) GiB", capsys.readouterr().out).group(1)
        assert float(gib) == pytest.approx(float(peak), abs=0.051), f"{name} quotes {gib} GiB, the estimator says {peak} (args: {args})"
