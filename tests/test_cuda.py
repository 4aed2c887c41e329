"""The CUDA-only paths, run on a GPU: bf16, per-block torch.compile, fused AdamW (FSDP2 DTensors too),
DeepSpeed's FusedAdam, NCCL. Every test here is skipped on a machine without CUDA (CI's, for one).

    python -m pytest -q tests/test_cuda.py        # on a machine with one or more GPUs

What they check is what the CPU suite cannot: that the paths the trainer takes only on a GPU train,
agree with one another, and report sensible speed and memory.
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.multiprocessing as mp
from launch import TINY, metrics, ok, run

from gpt2_scale import memory
from gpt2_scale.zoo import ModelConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ENGINES = ["ddp", "fsdp", "zero1", "zero2", "zero3"]


def test_every_engine_trains_in_bf16_with_compile_and_fused_adam(tmp_path):
    """engine.dtype=auto and engine.compile=None mean bf16 and per-block compile on CUDA; the optimizers are
    torch's fused AdamW (DDP, FSDP2) and DeepSpeed's FusedAdam (ZeRO). Same seed, same data: the runs must
    agree to bf16 resolution, and the loss must fall."""
    args = TINY + ["--max-steps", "30", "--total-batch-tokens", "256", "--lr", "3e-3", "--optim.warmup_steps=3",
                   "--log.val_every=0", "--engine.device=cuda"]
    def train(engine: str):  # the five runs share the GPU at once: a tiny model, and a lent GPU's minutes are few
        return run("recipes/tiny.py", args + ["--engine", engine, "--run-dir", str(tmp_path / engine)], timeout=600)

    with ThreadPoolExecutor(len(ENGINES)) as pool:
        procs = dict(zip(ENGINES, pool.map(train, ENGINES)))
    losses = {}
    for engine in ENGINES:
        out = ok(procs[engine])
        assert "on cuda" in out, out[:2000]
        losses[engine] = metrics(tmp_path / engine)
        assert all(math.isfinite(x) for x in losses[engine]), (engine, losses[engine])
        assert losses[engine][-1] < losses[engine][0] - 1.0, (engine, losses[engine])
    for engine in ENGINES[1:]:
        # bf16 compute: a relative 2^-7 per operation; over 30 steps the runs drift apart slowly
        torch.testing.assert_close(losses[engine][:5], losses["ddp"][:5], rtol=2e-2, atol=0,
                                   msg=lambda m, e=engine: f"{e} {losses[e][:5]} vs ddp {losses['ddp'][:5]}: {m}")


@pytest.mark.parametrize("first,then", [("zero1", "fsdp"), ("fsdp", "zero3"), ("zero2", "ddp")])
def test_a_bf16_run_continues_under_another_engine(tmp_path, first, then):
    """The checkpoint layout on the GPU paths: bf16 16-bit copies (ZeRO's refreshed from the loaded fp32 partitions,
    FSDP2's cast by its policy) and FusedAdam's step. Losses after the move follow the uninterrupted run to bf16
    resolution."""
    args = TINY + ["--total-batch-tokens", "256", "--lr", "3e-3", "--optim.warmup_steps=2", "--optim.decay_steps=8",
                   "--log.val_every=0", "--checkpoint.every=4", "--engine.device=cuda", "--engine", first]
    ok(run("recipes/tiny.py", args + ["--max-steps", "8", "--run-dir", str(tmp_path / "full")], timeout=600))
    ok(run("recipes/tiny.py", args + ["--max-steps", "4", "--run-dir", str(tmp_path / "part")], timeout=600))
    ok(run("recipes/tiny.py", ["--resume", str(tmp_path / "part"), "--engine", then, "--max-steps", "8"], timeout=600))
    torch.testing.assert_close(metrics(tmp_path / "part"), metrics(tmp_path / "full"), rtol=2e-2, atol=0)


def test_engines_match_the_fp32_reference_on_the_gpu():
    """The equivalence harness on CUDA (fp32, one rank): the engines' GPU code paths change nothing."""
    out = run("tools/check_equivalence.py", ["--model", "gpt2-tiny", "--steps", "4"], timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "OK: tolerance" in out.stdout


def test_bench_reports_mfu_against_the_measured_matmul_and_memory_close_to_the_estimate(tmp_path):
    """gpt2-124m, bf16, B=8, T=1024 on one GPU, eager (the estimator's constants are eager PyTorch's; compiled code
    saves less): MFU against the matmul measured in the run, and the peak allocated within 15% of the estimate
    (gpt2_scale.memory; the bench prints the ratio), which leaves out the allocator's rounding and workspaces."""
    out = ok(run("tools/bench.py", ["--model", "gpt2-124m", "--engines", "ddp", "--micro-batch", "8", "--seq-len", "1024",
                                    "--warmup", "3", "--steps", "5", "--compile", "off"], timeout=900))
    row = next(line for line in out.splitlines() if line.startswith("| ddp"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    mfu_matmul = cells[9]  # the datasheet column is empty on GPUs PEAK_TFLOPS does not know
    assert mfu_matmul.endswith("%") and 5 < float(mfu_matmul[:-1]) < 100, row
    allocated = float(re.search(r"allocated ([\d,.]+) MiB", cells[10]).group(1).replace(",", "")) * 2**20
    est = memory.estimate(ModelConfig.from_name("gpt2-124m", pad_vocab=True), "ddp", 1, 8, 1024, bf16=True)
    printed = float(re.search(r"peak/estimate ([\d.]+)", cells[11]).group(1))
    assert printed == pytest.approx(allocated / est.total, abs=0.011), (cells[11], allocated / 2**30, est.total / 2**30)
    assert 0.85 < allocated / est.total < 1.15, (allocated / 2**30, est.total / 2**30, est.phases)


def test_the_trainer_weighs_its_estimate_against_the_gpus_memory():
    """memory.device_bytes, what Engine.memory_report warns against (the report itself is tested on CPU)."""
    free, total = torch.cuda.mem_get_info()
    assert free <= memory.device_bytes(torch.device("cuda")) == pytest.approx(total, rel=0.02)
    assert memory.device_bytes(torch.device("cpu")) is None


def test_training_writes_mfu_and_peak_memory_to_the_metrics(tmp_path):
    run_dir = tmp_path / "run"
    ok(run("recipes/tiny.py", TINY + ["--max-steps", "6", "--total-batch-tokens", "128", "--log.val_every=0",
                                      "--engine.device=cuda", "--log.peak_tflops=100", "--run-dir", str(run_dir)],
           timeout=600))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "train_loss" in r][-1]
    assert last.get("mfu", 0) > 0 and last["peak_mem_gb"] > 0, last


@pytest.mark.parametrize("kernel", ["flash", "cudnn", "efficient"])
def test_each_attention_kernel_trains_compiled_in_bf16(kernel):
    """engine.attention on our shapes (head dim 64, as every GPT-2 size; T=1024), bf16, blocks compiled as the
    trainer compiles them: the kernel asked for runs in forward and backward, and the loss is auto's."""
    from torch.profiler import profile

    from gpt2_scale.config import EngineSection
    from gpt2_scale.device import resolve
    from gpt2_scale.engines.base import prepare_model
    from gpt2_scale.model import GPT

    config = ModelConfig(n_layer=2, n_head=4, n_embd=256, block_size=1024, vocab_size=50304)
    idx = torch.randint(0, 50257, (4, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ops, losses = {}, {}
    for name in ("auto", kernel):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(config).cuda()
        engine = EngineSection(attention=name)
        runtime = resolve("train", torch.device("cuda"), engine)
        assert runtime.compile == "block" and runtime.bf16
        prepare_model(model, engine, runtime)
        def step(model=model, runtime=runtime):
            with runtime.autocast():
                _, loss = model(idx, idx)
            loss.backward()
            return loss

        step()  # compiles
        with profile() as prof:
            loss = step()
        ops[name] = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
        losses[name] = loss.item()
    own = {"flash": "flash_attention", "cudnn": "cudnn_attention", "efficient": "efficient_attention"}[kernel]
    assert ops[kernel] == {f"aten::_scaled_dot_product_{own}", f"aten::_scaled_dot_product_{own}_backward"}, ops
    assert losses[kernel] == pytest.approx(losses["auto"], rel=1e-2), losses


def _step_without_host_sync(rank: int, name: str, port: int) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from gpt2_scale import distributed, engines
    from gpt2_scale.config import Config, EngineSection, ModelSection, TrainSection
    from gpt2_scale.step import optimizer_step
    from gpt2_scale.train import build_model

    env = distributed.init("cuda")
    cfg = Config(model=ModelSection(name="gpt2-tiny"), train=TrainSection(micro_batch=4, seq_len=128, total_batch_tokens=1024),
                 engine=EngineSection(name=name))
    engine = engines.build(cfg, env)
    engine.setup(build_model(cfg).to(env.device))
    batches = [(torch.randint(0, 50257, (4, 128), device=env.device),) * 2 for _ in range(2)]
    for _ in range(3):  # compile and allocate first
        optimizer_step(engine, batches, 1e-4, env.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host wait in the step raises
    try:
        loss, norm = optimizer_step(engine, batches, 1e-4, env.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(loss.item()) and math.isfinite(norm.item())
    distributed.shutdown()


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_the_optimizer_step_never_waits_for_the_device(engine):
    """The trainer reads the loss only on log steps; the step itself (clipping included) must queue work
    without a host sync, or the GPU idles while Python catches up."""
    from gpt2_scale.distributed import free_port

    mp.start_processes(_step_without_host_sync, args=(engine, free_port()), nprocs=1, start_method="spawn")


def _zero3_compiled_against_eager(rank: int, port: int, tmp: str) -> None:
    """Losses of 6 steps of gpt2-tiny under ZeRO-3 (fp32, one rank): eager, per-block and whole-model compile."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from gpt2_scale import distributed, engines
    from gpt2_scale.config import Config, EngineSection, ModelSection, TrainSection
    from gpt2_scale.model import GPT
    from gpt2_scale.step import optimizer_step

    env = distributed.init("cuda")
    small = ModelConfig.from_name("gpt2-tiny", pad_vocab=False)
    gen = torch.Generator().manual_seed(0)
    steps = [[(torch.randint(0, small.vocab_size, (4, 64), generator=gen), torch.randint(0, small.vocab_size, (4, 64), generator=gen))]
             for _ in range(6)]
    losses = {}
    for scope in (None, "block", "model"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        cfg = Config(model=ModelSection(name="gpt2-tiny", pad_vocab=False), train=TrainSection(micro_batch=4, seq_len=64, total_batch_tokens=256),
                     engine=EngineSection(name="zero3", dtype="fp32", compile=scope is not None, compile_scope=scope or "block"))
        engine = engines.build(cfg, env)
        engine.setup(GPT(small))
        losses[scope] = [optimizer_step(engine, [(x.cuda(), y.cuda()) for x, y in batches], 3e-3, env.device)[0].item() for batches in steps]
        engine.close()
    losses["linear"] = torch.nn.functional.linear is torch._C._nn.linear
    torch.save(losses, os.path.join(tmp, "results.pt"))
    distributed.shutdown()


def test_zero3_compiled_trains_as_eager(tmp_path):
    """Compiled ZeRO-3 trains as eager ZeRO-3 does. On an H200 (torch 2.11, 2026-11-26) compiled blocks trained wrong
    from the second step: DeepSpeed's memory_efficient_linear swapped torch.nn.functional.linear for an
    autograd.Function whose weights got zero gradients when compiled. With it off, this passed on an H200 on
    2026-11-27, and compiling ZeRO-3 is allowed on CUDA since."""
    from launch import spawned_world

    losses = spawned_world(_zero3_compiled_against_eager, 1, tmp_path)
    assert losses["linear"]
    for scope in ("block", "model"):
        torch.testing.assert_close(losses[scope], losses[None], rtol=1e-3, atol=0,
                                   msg=lambda m, s=scope: f"{s}: {losses[s]} vs eager {losses[None]}: {m}")
