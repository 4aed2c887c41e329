"""torch.compile levers (engine.compile_scope / compile_mode): whole-model and per-block (+ loss) compile train the
same model as eager under DDP, FSDP2 and ZeRO-3 (DeepSpeed's own engine.compile()), keeps parameter names, and the combination that
cannot compile is refused.

One spawned 1-rank CPU world runs everything (a process group, and DeepSpeed's global state, stay out of pytest's
process); compiling even a tiny model takes tens of seconds here, so there are few cases.
"""

import os

import pytest
import torch
from launch import spawned_world

from gpt2_scale.model import GPT
from gpt2_scale.zoo import ModelConfig

SMALL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256)
B, T = 2, 16
COMPILED = ("ddp", "fsdp", "zero3")


def _config(engine: str, compile_: bool, **engine_fields):
    from gpt2_scale.config import Config, EngineSection, ModelSection, TrainSection

    return Config(
        model=ModelSection(name="gpt2-tiny", pad_vocab=False),
        train=TrainSection(micro_batch=B, seq_len=T, total_batch_tokens=B * T * 2),  # 2 micro-steps
        engine=EngineSection(name=engine, dtype="fp32", compile=compile_, **engine_fields),
    )


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from torch._dynamo.utils import counters

    from gpt2_scale import distributed, engines
    from gpt2_scale.config import ConfigError
    from gpt2_scale.step import optimizer_step

    env = distributed.init("cpu")
    gen = torch.Generator().manual_seed(0)
    steps = [[(torch.randint(0, 256, (B, T), generator=gen), torch.randint(0, 256, (B, T), generator=gen)) for _ in range(2)]
             for _ in range(2)]

    def train(cfg):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        engine = engines.build(cfg, env)
        engine.setup(GPT(SMALL))
        losses = [optimizer_step(engine, batches, 1e-3, env.device)[0].item() for batches in steps]
        blocks_compiled = any(block._compiled_call_impl is not None for block in engine.module.transformer.h)
        return {"losses": losses, "keys": list(engine.module.state_dict()), "graphs": counters["stats"]["unique_graphs"],
                "weights": engine.full_state_dict(), "blocks compiled": blocks_compiled}

    results = {"eager": train(_config("ddp", False))}
    for name in COMPILED:
        results[name] = train(_config(name, True, compile_scope="model"))
        results[name, "block"] = train(_config(name, True, compile_scope="block"))
    results["zero3", "loss"] = train(_config("zero3", True, compile_scope="loss"))  # ZeRO-3's default on CUDA
    results["ddp", "block", "loss_chunk"] = train(_config("ddp", True, compile_scope="block", loss_chunk=8))  # after zero3
    results["linear after zero3"] = torch.nn.functional.linear is torch._C._nn.linear
    try:
        train(_config("fsdp", True, compile_scope="model", activation_checkpointing=True))
    except ConfigError as e:
        results["refused"] = str(e)
    torch.save(results, os.path.join(tmp, "results.pt"))
    distributed.shutdown()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawned_world(_worker, 1, tmp_path_factory.mktemp("compile"))


@pytest.mark.parametrize(("engine", "scope"), [(e, s) for e in COMPILED for s in ("model", "block")] + [("zero3", "loss")])
def test_compile_trains_as_eager_and_keeps_names(results, engine, scope):
    eager, got = results["eager"], results[engine] if scope == "model" else results[engine, scope]
    # block scope: the blocks (one graph, reused by every block) and the loss, compiled apart; loss scope: the loss
    assert got["graphs"] >= {"model": 1, "block": 2, "loss": 1}[scope], f"{engine}: {got['graphs']} graph(s) compiled"
    assert got["blocks compiled"] == (scope == "block"), f"{engine} {scope}: blocks compiled {got['blocks compiled']}"
    assert got["keys"] == eager["keys"] == list(GPT(SMALL).state_dict())  # no _orig_mod. prefix
    torch.testing.assert_close(got["losses"], eager["losses"], rtol=1e-5, atol=0)
    # Weights: the key bias's gradient is rounding noise (softmax ignores it) and Adam scales noise up to a step of
    # lr = 1e-3, so single elements get a tenth of a step; on average the models are the same.
    for name, w in eager["weights"].items():
        diff = (got["weights"][name] - w).abs()
        assert diff.max() < 1e-4 and diff.mean() < 1e-6, f"{engine} {name}: max {diff.max():.2e}, mean {diff.mean():.2e}"


def test_block_compile_with_the_fused_loss_trains_as_eager(results):
    got, eager = results["ddp", "block", "loss_chunk"], results["eager"]
    # the blocks and the fused loss's chunk body (the full-logits loss is never called with a chunk)
    assert got["graphs"] >= 2, f"{got['graphs']} graph(s) compiled"
    torch.testing.assert_close(got["losses"], eager["losses"], rtol=1e-5, atol=0)


def test_zero3_leaves_torchs_linear_as_it_was(results):
    """DeepSpeed's memory_efficient_linear (its default) swaps torch.nn.functional.linear for good, and under torch
    2.11 every model compiled later in the process (the fused-loss run above, after zero3's) got zero weight
    gradients; gpt2-scale turns it off."""
    assert results["linear after zero3"]


def test_fsdp_whole_model_compile_with_checkpointing_is_refused(results):
    assert "engine.compile_scope=block" in results.get("refused", "")


def test_zero3_compiles_only_its_loss_on_cuda_unless_more_is_asked_for():
    """ZeRO-3 trains right compiled on a GPU since DeepSpeed's memory_efficient_linear is off
    (tests/test_cuda.py::test_zero3_compiled_trains_as_eager, on an H200), so every scope is allowed; by default it
    compiles only the loss on CUDA, since its compiled blocks were timed slower than eager (docs/benchmarks.md);
    every other engine compiles its blocks and loss."""
    from gpt2_scale.config import EngineSection
    from gpt2_scale.device import compile_scope, resolve

    cuda = torch.device("cuda")
    for engine in ["ddp", "fsdp", "zero1", "zero2"]:
        assert compile_scope(EngineSection(name=engine), cuda) == "block", engine
    assert compile_scope(EngineSection(name="zero3"), cuda) == "loss"
    assert compile_scope(EngineSection(name="zero3", compile=False), cuda) is None
    assert compile_scope(EngineSection(name="zero3"), torch.device("cpu")) is None
    for scope in ("block", "model", "loss"):
        assert resolve("train", cuda, EngineSection(name="zero3", compile=True, compile_scope=scope)).compile == scope


def test_sampling_and_hellaswag_run_compiled_blocks_eagerly(tmp_path):
    """The trainer samples and runs HellaSwag between steps with its compiled blocks. The KV cache's layer index
    and position, and each HellaSwag batch's width, would recompile them up to dynamo's recompile limit (minutes
    on a GPU, for seconds of work): both run eagerly, and nothing is compiled for them."""
    from test_hellaswag import write_examples
    from torch._dynamo.utils import counters

    from gpt2_scale.eval.hellaswag import evaluate, load_examples
    from gpt2_scale.generate import generate

    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50304))
    for block in model.transformer.h:
        block.compile()
    counters.clear()
    generate(model, torch.zeros(2, 3, dtype=torch.long), 4)
    evaluate(model, load_examples(write_examples(tmp_path / "hellaswag.jsonl")), "cpu")
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])


def _attention_ops(model: GPT, idx: torch.Tensor) -> tuple[set[str], float]:
    """The attention ops a training forward and backward ran (``aten::`` names), and its loss."""
    from torch.profiler import profile

    with profile() as prof:
        _, loss = model(idx, idx)
        loss.backward()
    return {e.key for e in prof.key_averages() if "attention_" in e.key}, loss.item()


def test_the_attention_kernel_is_the_one_asked_for():
    """engine.attention restricts scaled_dot_product_attention to one kernel, in forward and in checkpointing's
    recompute, and is refused before a run where the device lacks it. On CPU PyTorch has the flash and math ones."""
    from gpt2_scale.config import ConfigError, EngineSection
    from gpt2_scale.device import resolve
    from gpt2_scale.model import Options

    flash = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
    idx = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    losses = {}
    for kernel, checkpointing in [("auto", False), ("flash", True), ("math", False), ("math", True)]:
        torch.manual_seed(0)
        ops, losses[kernel, checkpointing] = _attention_ops(GPT(SMALL, Options(checkpointing, attention=kernel)), idx)
        assert ops == ({"aten::_scaled_dot_product_attention_math"} if kernel == "math" else flash), (kernel, checkpointing, ops)
    assert max(losses.values()) - min(losses.values()) < 1e-5, losses
    for kernel in ("cudnn", "efficient"):  # CUDA's kernels
        with pytest.raises(ConfigError, match=f"engine.attention={kernel} needs a CUDA GPU"):
            resolve("train", "cpu", EngineSection(attention=kernel))


def test_the_attention_kernel_is_traced_into_compiled_blocks():
    """The restriction is entered inside the blocks' forward, so it is part of the graph dynamo captures. Around a
    compiled call it would not be, and the compile caches, keyed on the graph, would serve whichever kernel was
    traced first, here or in an earlier process: on CPU, math after flash or auto after math (seen with Inductor's
    caches), and a benchmark row would time the wrong kernel."""
    from gpt2_scale.config import EngineSection
    from gpt2_scale.device import resolve
    from gpt2_scale.engines.base import prepare_model

    graphs: list[str] = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    for kernel in ("math", "auto"):
        torch._dynamo.reset()
        graphs.clear()
        model = GPT(SMALL)
        engine = EngineSection(dtype="fp32", compile=False, attention=kernel)
        prepare_model(model, engine, resolve("train", "cpu", engine))
        for block in model.transformer.h:
            block.compile(backend=capture)
        model(torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long))[1].backward()
        restricted = [g for g in graphs if "_sdpa_kernel" in g and "'MATH'" in g]
        assert len(restricted) == (len(graphs) if kernel == "math" else 0) and graphs, (kernel, graphs)


def test_a_cached_generation_step_leaves_the_kernel_to_pytorch():
    """A KV-cache step attends through a mask, which not every kernel takes: only the prompt's causal pass
    uses the kernel asked for."""
    from torch.profiler import profile

    from gpt2_scale.generate import generate
    from gpt2_scale.model import Options

    model = GPT(SMALL, Options(attention="math"))
    with profile() as prof:
        generate(model, torch.zeros(2, 3, dtype=torch.long), 4)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("aten::_scaled_dot_product_attention_math") == SMALL.n_layer  # the prompt
    assert counts.get("aten::_scaled_dot_product_flash_attention_for_cpu") == 3 * SMALL.n_layer  # 3 cached steps
