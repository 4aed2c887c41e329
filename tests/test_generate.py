"""Generation with and without the KV cache, sampling options, and the sampling CLI."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from launch import run_module

from gpt2_scale import GPT, ModelConfig
from gpt2_scale import sample as sample_cli
from gpt2_scale.device import default_device, resolve_device
from gpt2_scale.generate import generate

BLOCK = 32
VOCAB = 500


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(2, 4, 64, block_size=BLOCK, vocab_size=VOCAB)).eval()


def _prompt(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _record_forwards(model):
    """Each forward call's (number of tokens, whether it used a cache)."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].size(1), kwargs.get("cache") is not None))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("prompt_len", [1, 5, BLOCK - 3, BLOCK, BLOCK + 7])
def test_greedy_cache_equals_no_cache(model, prompt_len):
    idx = _prompt(2, prompt_len)
    with_cache = generate(model, idx, 12, temperature=0, use_cache=True)
    without = generate(model, idx, 12, temperature=0, use_cache=False)
    assert with_cache.shape == (2, prompt_len + 12)
    assert torch.equal(with_cache[:, :prompt_len], idx)
    assert torch.equal(with_cache, without)


def test_cache_prefills_once_then_falls_back_past_the_context(model):
    idx = _prompt(1, BLOCK - 3)
    calls, handle = _record_forwards(model)
    try:
        generate(model, idx, 8, temperature=0)
    finally:
        handle.remove()
    # prefill of 29, then 3 single tokens up to 32 in context, then 4 full windows of 32 without cache
    assert calls == [(BLOCK - 3, True)] + [(1, True)] * 3 + [(BLOCK, False)] * 4


def test_no_cache_runs_full_windows(model):
    calls, handle = _record_forwards(model)
    try:
        generate(model, _prompt(1, 4), 3, temperature=0, use_cache=False)
    finally:
        handle.remove()
    assert calls == [(4, False), (5, False), (6, False)]


def test_seed_determinism_and_top_k(model):
    idx = _prompt(3, 6)

    def run(seed, **kw):
        return generate(model, idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(7, top_k=10), run(7, top_k=10))
    assert not torch.equal(run(7, top_k=10), run(8, top_k=10))
    greedy = generate(model, idx, 20, temperature=0)
    assert torch.equal(run(7, top_k=1), greedy)  # top-1 sampling is greedy


def test_top_k_only_samples_among_the_k_most_likely(model):
    idx = _prompt(1, 6).expand(200, 6)
    out = generate(model, idx, 1, top_k=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top3 = set(model(idx[:1])[0][0, -1].topk(3).indices.tolist())
    assert set(out[:, -1].tolist()) <= top3
    assert len(set(out[:, -1].tolist())) > 1


def test_greedy_ignores_generator_and_temperature_scales(model):
    idx = _prompt(1, 4)
    a = generate(model, idx, 10, temperature=0, generator=torch.Generator().manual_seed(1))
    b = generate(model, idx, 10, temperature=0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    # a very low temperature concentrates sampling on the argmax
    cold = generate(model, idx, 10, temperature=1e-4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cold, a)
    frozen = generate(model, idx, 10, temperature=1e-45, generator=torch.Generator().manual_seed(3))  # logits/T overflow
    assert torch.equal(frozen, a)


def test_restores_train_mode_and_handles_1d_and_zero_tokens(model):
    model.train()
    try:
        out = generate(model, torch.tensor([1, 2, 3]), 4, temperature=0)
        assert model.training
    finally:
        model.eval()
    assert out.shape == (7,) and out[:3].tolist() == [1, 2, 3]
    idx = _prompt(2, 5)
    assert torch.equal(generate(model, idx, 0), idx)
    assert not generate(model, idx, 2).requires_grad


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_new_tokens=-1), dict(temperature=-0.5), dict(top_k=0), dict(idx=torch.zeros(2, 0, dtype=torch.long))],
)
def test_rejects_bad_arguments(model, kwargs):
    args = dict(idx=_prompt(1, 3), max_new_tokens=2) | kwargs
    with pytest.raises(ValueError):
        generate(model, **args)


def test_default_device():
    assert default_device() in ("cpu", "cuda", "mps")
    assert resolve_device("auto").type == default_device()
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_auto_means_one_thing_per_purpose(monkeypatch):
    """device.resolve's table: training never picks MPS; sampling computes in fp32 and evaluation in bf16 on CUDA;
    only training compiles."""
    from gpt2_scale import device as device_module
    from gpt2_scale.config import EngineSection
    from gpt2_scale.device import resolve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: True)
    assert default_device("train") == "cpu" and default_device("sample") == default_device("evaluate") == "mps"
    cuda = torch.device("cuda")
    train, evaluate, sample = resolve("train", cuda), resolve("evaluate", cuda), resolve("sample", cuda)
    assert (train.dtype, train.compile) == (torch.bfloat16, "block")
    assert (evaluate.dtype, evaluate.compile) == (torch.bfloat16, None)
    assert (sample.dtype, sample.compile) == (torch.float32, None)
    cpu = torch.device("cpu")
    assert resolve("train", cpu).dtype == resolve("evaluate", cpu).dtype == torch.float32
    assert resolve("train", cpu, EngineSection(dtype="bf16")).dtype == torch.bfloat16
    assert resolve("train", cpu).compile is None and resolve("train", cpu, EngineSection(compile=True)).compile == "block"


# ---------------------------------------------------------------------------------------------- CLI


def _cli(capsys, *argv):
    code = sample_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_samples_tiny_model(capsys):
    argv = ["--model", "gpt2-tiny", "--prompt", "Hello", "--num-samples", "2", "--max-new-tokens", "8"]
    argv += ["--seed", "0", "--device", "cpu"]
    code, out, err = _cli(capsys, *argv)
    assert code == 0
    samples = out.rstrip("\n").split("\n" + sample_cli.SEPARATOR + "\n")
    assert len(samples) == 2 and all(s.startswith("Hello") and len(s) > len("Hello") for s in samples)
    assert "gpt2-tiny (random init)" in err
    assert _cli(capsys, *argv)[1] == out  # the same seed: the same weights and the same samples


def test_cli_no_cache_greedy_matches_cache(capsys):
    args = ["--model", "gpt2-tiny", "--prompt", "The", "--max-new-tokens", "10", "--temperature", "0", "--seed", "1"]
    code, cached, _ = _cli(capsys, *args)
    assert code == 0
    assert _cli(capsys, *args, "--no-cache")[1] == cached


def test_cli_empty_prompt_starts_from_end_of_text(capsys):
    code, out, _ = _cli(capsys, "--model", "gpt2-tiny", "--max-new-tokens", "5", "--seed", "0")
    assert code == 0 and not out.startswith("<|endoftext|>")  # the start token is not printed


def test_cli_hf_directory(capsys, tmp_path):
    from gpt2_scale.hf import export_hf

    torch.manual_seed(0)
    export_hf(GPT(ModelConfig.from_name("gpt2-tiny")), tmp_path / "exp")
    code, out, err = _cli(capsys, "--hf", str(tmp_path / "exp"), "--prompt", "Hi", "--max-new-tokens", "4")
    assert code == 0 and out.startswith("Hi")
    assert "gpt2-tiny from" in err


def test_cli_ckpt_uses_checkpoint_module(capsys, tmp_path, monkeypatch):
    from gpt2_scale import checkpoint

    loaded = []

    def load_model(run_dir):
        loaded.append(run_dir)
        return GPT(ModelConfig.from_name("gpt2-tiny"))

    monkeypatch.setattr(checkpoint, "load_model", load_model)
    code, out, _ = _cli(capsys, "--ckpt", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "3")
    assert code == 0 and out.startswith("Hi") and loaded == [str(tmp_path)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "gpt2-tiny", "--init", "pretrained"], "has no pretrained checkpoint"),
        (["--hf", "/does/not/exist"], "no such directory"),
        (["--ckpt", "/does/not/exist"], "no such directory"),
        (["--hf", __file__], "not a directory"),
        (["--model", "gpt2-tiny", "--device", "nonsense"], "unknown device"),
        (["--model", "gpt2-tiny", "--device", "meta"], "device 'meta' is not one this package runs on; choose one of auto, cpu"),
    ],
)
def test_cli_bad_input_exits_2_without_traceback(capsys, argv, message):
    code, out, err = _cli(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err and out == ""


def test_cli_ckpt_of_a_directory_that_is_no_run(capsys, tmp_path):
    code, _, err = _cli(capsys, "--ckpt", str(tmp_path))
    assert code == 2 and "not a run directory" in err and "Traceback" not in err


def test_cli_hf_directory_without_checkpoint(capsys, tmp_path):
    code, _, err = _cli(capsys, "--hf", str(tmp_path))
    assert code == 2 and "config.json" in err


def _tiny_export(path):
    from gpt2_scale.hf import export_hf

    return export_hf(GPT(ModelConfig(1, 2, 32, block_size=16, vocab_size=100)), path)


def test_cli_hf_corrupt_weights_is_one_line_without_traceback(tmp_path):
    out = _tiny_export(tmp_path / "exp")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])  # an interrupted copy
    r = _run_module("--hf", str(out), "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cpu")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == "", r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: --hf {out}: could not read {weights} (SafetensorError")


@pytest.mark.parametrize(
    "config, message",
    [
        ("{not json", "config.json is not valid JSON"),
        ('{"model_type": "gpt2", "n_layer": "two"}', "config.json: n_layer is 'two', expected a positive integer"),
        ('{"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 16, "vocab_size": 100, '
         '"layer_norm_epsilon": "x"}', "config.json: layer_norm_epsilon is 'x', expected a number"),
    ],
)
def test_cli_hf_corrupt_config_is_one_line(capsys, tmp_path, config, message):
    out = _tiny_export(tmp_path / "exp")
    (out / "config.json").write_text(config)
    code, stdout, err = _cli(capsys, "--hf", str(out), "--prompt", "Hi", "--max-new-tokens", "2")
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert err.startswith(f"error: --hf {out}: {out / 'config.json'}") and message in err


def test_cli_ckpt_user_error_is_one_line(capsys, tmp_path, monkeypatch):
    from gpt2_scale import checkpoint
    from gpt2_scale.errors import UserError

    def broken(run_dir):
        raise type("BrokenCheckpoint", (UserError,), {})(f"{run_dir}/model_optim.pt is truncated")

    monkeypatch.setattr(checkpoint, "load_model", broken)
    code, out, err = _cli(capsys, "--ckpt", str(tmp_path))
    assert (code, out, err) == (2, "", f"error: --ckpt {tmp_path}: {tmp_path}/model_optim.pt is truncated\n")
    assert issubclass(sample_cli.UsageError, UserError)


@pytest.mark.parametrize(
    "argv,says",
    [(["--model", "gpt2-tiny", "--num-samples", "0"], "--num-samples must be >= 1"), (["--hf", "x", "--init", "random"], "--init goes with --model"),
     ([], "one of the arguments"), (["--model", "gpt2-tiny", "--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
     (["--model", "gpt2-tiny", "--seed", str(2**64)], r"--seed: must be in \[0, 2\*\*32\)"),
     (["--model", "gpt2-tiny", "--seed", "-1"], "--seed: must be")],
)
def test_cli_usage_errors_exit_2_in_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        sample_cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(says, err) and "Traceback" not in err, err


def _run_module(*argv):
    return run_module("gpt2_scale.sample", list(argv))


def test_cli_module_entry_point_gpt2_124m_on_cpu():
    """The documented command: a randomly initialised gpt2-124m prints text on the CPU."""
    r = _run_module("--model", "gpt2-124m", "--init", "random", "--prompt", "Hello", "--max-new-tokens", "20",
                    "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and len(r.stdout.strip()) > len("Hello")


def test_cli_module_bad_name_exits_2():
    r = _run_module("--model", "gpt2-huge")
    assert r.returncode == 2 and "unknown model" in r.stderr and "Traceback" not in r.stderr


def test_cli_stops_quietly_when_its_reader_leaves():
    """`python -m gpt2_scale.sample ... | head -1`: the pipe closes early, which is no error of ours."""
    import subprocess

    from launch import env

    argv = [sys.executable, "-m", "gpt2_scale.sample", "--model", "gpt2-tiny", "--num-samples", "100", "--max-new-tokens", "2",
            "--prompt", "word " * 150]  # 100 samples of the prompt: 80 kB, more than a pipe holds
    proc = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_cli_out_of_memory_is_one_line_naming_what_to_lower(monkeypatch, capsys):
    """Too many samples for the machine: the allocator's RuntimeError (on CPU) or CUDA's, as one line with exit 1."""
    from gpt2_scale import sample

    def no_room(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(sample, "generate", no_room)
    assert sample.main(["--model", "gpt2-tiny", "--num-samples", "3", "--max-new-tokens", "2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "error: out of memory on cpu generating 3 sample(s) of up to 3 tokens; lower --num-samples or --max-new-tokens"
    monkeypatch.setattr(sample, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other failure keeps its traceback
        sample.main(["--model", "gpt2-tiny", "--device", "cpu"])
