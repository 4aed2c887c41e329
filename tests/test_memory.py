"""Memory: the ZeRO accounting against what each engine's ranks hold, activation checkpointing under every
engine, and the estimator's activation constants against saved-for-backward bytes measured here.

One spawned world of 2 CPU ranks runs every engine (DeepSpeed's setup dominates the cost).
"""

import functools
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import env, spawned_world

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


def _saved_block_bytes(bf16: bool, checkpointing: bool, n_layer: int, batch: int = 8, seq: int = 256, d: int = 128,
                       loss_chunk: int = 0) -> int:
    model = GPT(ModelConfig(n_layer=n_layer, n_head=4, n_embd=d, block_size=seq, vocab_size=128),
                Options(activation_checkpointing=checkpointing, loss_chunk=loss_chunk))
    saved: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, 128, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        model(idx, idx)
    return sum(saved.values())


@pytest.mark.parametrize("bf16", [False, True])
def test_activation_constants_are_what_a_block_saves(bf16):
    """The per-block bytes the estimator uses = the growth of saved bytes from 1 to 3 layers, per B·T·d."""
    tokens_x_d = 8 * 256 * 128
    per_layer = (_saved_block_bytes(bf16, False, 3) - _saved_block_bytes(bf16, False, 1)) / 2 / tokens_x_d
    per_layer_ckpt = (_saved_block_bytes(bf16, True, 3) - _saved_block_bytes(bf16, True, 1)) / 2 / tokens_x_d
    assert per_layer == pytest.approx(memory.BLOCK_BYTES[bf16], rel=0.05)
    assert per_layer_ckpt == pytest.approx(memory.CHECKPOINTED_BLOCK_BYTES, rel=0.05)


def test_a_fused_loss_chunk_saves_no_log_softmax():
    """With engine.loss_chunk the model saves grad_h (in place of lm_head's input) and the V·d weight gradient,
    not the B·T·V fp32 log-softmax."""
    B, T, V, d = 8, 256, 128, 128
    plain, fused = _saved_block_bytes(False, False, 1), _saved_block_bytes(False, False, 1, loss_chunk=300)
    assert plain - fused >= B * T * V * 4 - V * d * 4, f"{fused:,} B saved with the fused loss, {plain:,} B without"


def test_expected_state_bytes_follow_the_paper():
    psi = 1_000_000
    assert memory.expected_state_bytes(psi, "zero1", 8, bf16=True).total == 2 * psi + 2 * psi + 12 * psi // 8
    assert memory.expected_state_bytes(psi, "zero2", 8, bf16=True).total == 2 * psi + (2 + 12) * psi // 8
    assert memory.expected_state_bytes(psi, "zero3", 8, bf16=True).total == 16 * psi // 8
    assert memory.expected_state_bytes(psi, "zero2", 8, bf16=True, offload=True).optimizer == 0
    assert memory.expected_state_bytes(psi, "ddp", 8, bf16=True).total == 16 * psi
    with pytest.raises(ValueError, match="unknown engine"):
        memory.expected_state_bytes(psi, "zero4", 8, bf16=True)


def test_estimate_gpt2_xl_zero3_on_8_gpus():
    xl = ModelConfig.from_name("gpt2-xl")
    plain = memory.estimate(xl, "zero3", 8, 16, 1024)
    ckpt = memory.estimate(xl, "zero3", 8, 16, 1024, checkpointing=True)
    assert plain.states.total == 16 * xl.num_params() // 8
    assert ckpt.activations < plain.activations / 5 and ckpt.logits == plain.logits
    assert plain.total == plain.states.total + plain.activations + plain.logits
    assert memory.estimate(xl, "ddp", 8, 16, 1024).states.total == 8 * plain.states.total


def test_estimate_with_a_fused_loss_chunk():
    """engine.loss_chunk: one chunk's logits (c·V·LOGIT_BYTES) plus the V·d fp32 weight-gradient accumulator."""
    m = ModelConfig.from_name("gpt2-124m")
    plain = memory.estimate(m, "ddp", 1, 16, 1024)
    fused = memory.estimate(m, "ddp", 1, 16, 1024, loss_chunk=2048)
    assert fused.logits == 2048 * m.vocab_size * memory.LOGIT_BYTES[True] + m.vocab_size * m.n_embd * 4
    assert fused.logits < plain.logits / 6 and fused.activations == plain.activations and fused.states == plain.states
    whole = memory.estimate(m, "ddp", 1, 2, 64, loss_chunk=10**6)  # a chunk beyond B·T holds B·T tokens
    assert whole.logits == memory.logits_bytes(m, 2, 64, True) + m.vocab_size * m.n_embd * 4


def _tool(*args):
    return subprocess.run([sys.executable, "tools/estimate_memory.py", *args], cwd=ROOT, capture_output=True, text=True, env=env())


def test_estimate_memory_tool():
    out = _tool("--model", "gpt2-xl", "--engine", "zero3", "--world", "8", "--micro-batch", "16", "--seq-len", "1024",
                "--activation-checkpointing")
    assert out.returncode == 0, out.stderr
    est = memory.estimate(ModelConfig.from_name("gpt2-xl"), "zero3", 8, 16, 1024, checkpointing=True)
    assert f"{est.total / memory.GiB:.2f} GiB" in out.stdout and "12Ψ/N" in out.stdout
    bad = _tool("--model", "gpt2-xxl", "--engine", "zero3")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "gpt2-xl" in bad.stderr
    fused = _tool("--model", "gpt2-xl", "--micro-batch", "16", "--loss-chunk", "4096")
    est = memory.estimate(ModelConfig.from_name("gpt2-xl"), "ddp", 1, 16, 1024, loss_chunk=4096)
    assert fused.returncode == 0 and "c·V·10 + V·d·4" in fused.stdout and f"{est.logits / memory.GiB:.2f} GiB" in fused.stdout
    bad = _tool("--loss-chunk", "-1")
    assert bad.returncode == 2 and "argument --loss-chunk: must be >= 0" in bad.stderr
