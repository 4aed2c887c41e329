"""tools/bench.py: one row per engine with timings and model states, the walk-through's loop side by side, one-lever
--vary rows, failing rows that do not end the sweep, --json, bad input."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from launch import env

from gpt2_scale import bench, memory
from gpt2_scale.engines.deepspeed import DS_CONFIG_DIR
from gpt2_scale.tools.args import check_replaceable
from gpt2_scale.zoo import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(*args):
    return subprocess.run([sys.executable, "tools/bench.py", *args], cwd=ROOT, capture_output=True, text=True, env=env(), timeout=300)


def _rows(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| row |")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_bench_rows_for_two_engines_a_varied_lever_and_the_walkthrough(tmp_path):
    out = _tool("--model", "gpt2-tiny", "--engines", "ddp,zero1", "--micro-batch", "2", "--seq-len", "16", "--accum", "2",
                "--warmup", "1", "--steps", "2", "--compare-walkthrough", "--peak-tflops", "1", "--vary", "train.micro_batch=1",
                "--json", str(tmp_path / "bench.json"), "--profile", str(tmp_path / "profile"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _rows(out.stdout)
    assert [r[0] for r in rows] == ["ddp", "ddp micro_batch=1", "zero1", "zero1 micro_batch=1", "walkthrough"]
    assert [r[2] for r in rows] == ["2", "1", "2", "1", "2"]  # B: only the varied row changes
    psi = ModelConfig.from_name("gpt2-tiny", pad_vocab=True).num_params()
    ddp = rows[0]
    # one rank, fp32 on CPU: 4Ψ weights, 4Ψ gradients, 8Ψ Adam state, as the accounting says
    assert ddp[-1] == f"{memory.expected_state_bytes(psi, 'ddp', 1, bf16=False).total / 2**20:,.1f} MiB"
    estimate = memory.estimate(ModelConfig.from_name("gpt2-tiny", pad_vocab=True), "ddp", 1, 2, 16, bf16=False, accumulation=2)
    assert ddp[11] == f"{estimate.total / 2**20:,.1f} MiB" and rows[-1][11] == "-"  # none for the walk-through's loop
    assert ddp[8].endswith("%") and float(ddp[5].replace(",", "")) > 0  # MFU against --peak-tflops, ms/step
    assert "ours/walk-through tokens/s: ddp" in out.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["device"] == "cpu" and report["torch"] and report["date"].startswith("20")
    assert report["rows_planned"] == 5 and report["complete"] is True  # rewritten after each row: a cut-off sweep says so
    assert bench.to_json([], planned=5)["complete"] is False
    assert [r["name"] for r in report["rows"]] == [r[0] for r in rows]
    small = report["rows"][1]
    assert small["varied"] == {"train.micro_batch": "1"} and small["config"]["train"]["micro_batch"] == 1
    # tokens/s counts the row's own micro-batch: B x T x accum per step
    assert small["tokens_per_s"] == pytest.approx(1 * 16 * 2 / (small["ms_per_step"] / 1000))
    assert all(r["error"] is None and r["ms_per_step"] > 0 for r in report["rows"])
    assert report["rows"][0]["estimate_bytes"] == estimate.total
    # --profile: per row, the time by kind of work, the top ops, and a trace
    profiles = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert profiles == sorted(f"{bench.profile.file_name(r[0])}{ext}" for r in rows for ext in (".txt", ".trace.json.gz"))
    text = (tmp_path / "profile" / "zero1.txt").read_text()
    assert "3 profiled steps" in text and re.search(r"\nmatmul +[\d.]+ +[\d.]+%", text) and "aten::mm" in text, text


def test_profile_kinds_and_file_names():
    from gpt2_scale.bench.profile import file_name, kind

    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kind("aten::addmm") == "matmul"
    assert kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert kind("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "communication"
    assert kind("triton_per_fused__to_copy_add_native_layer_norm_0") == "compiled"
    assert kind("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor>") == "optimizer"
    assert kind("Memcpy DtoD (Device -> Device)") == "copy" and kind("aten::gelu") == "other"
    assert file_name("ddp compile_mode=reduce-overhead") == "ddp_compile_mode-reduce-overhead"


def test_a_gpu_profile_counts_kernels_and_not_the_ranges_named_around_them():
    """On CUDA, record_function ranges (DDP's forward) appear on the GPU's timeline spanning kernels counted
    already; counted as kernels, an H100's ddp row took 186 ms of kernels in a 146 ms step and no idle time."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from gpt2_scale.bench.profile import summary

    def event(key, ms, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(key=key, self_device_time_total=ms * 1000, count=1, device_type=device, is_user_annotation=annotation)

    events = [event("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN", 60), event("triton_poi_fused_gelu_0", 30),
              event("DistributedDataParallel.forward", 40, annotation=True), event("aten::mm", 55, device=DeviceType.CPU)]
    text = summary(events, on_device=True, steps=1, wall_ms=100)
    assert "GPU kernel time per step: 90.0 ms" in text and "DistributedDataParallel" not in text, text
    assert re.search(r"\(GPU idle\) +10\.00 +10\.0% of wall", text), text


def test_vary_changes_one_key_per_row_from_the_base_row():
    base = bench.BenchSpec("ddp", (("model.name", "gpt2-tiny"), ("train.micro_batch", "16"), ("train.seq_len", "64")), accum=2)
    specs = bench.sweep(base, ["ddp", "fsdp"], [("train.micro_batch", ["32", "64"]), ("engine.compile_mode", ["reduce-overhead"])])
    assert [s.name for s in specs] == [
        "ddp", "ddp micro_batch=32", "ddp micro_batch=64", "ddp compile_mode=reduce-overhead",
        "fsdp", "fsdp micro_batch=32", "fsdp micro_batch=64", "fsdp compile_mode=reduce-overhead",
    ]
    cfgs = [s.config(world=2) for s in specs[:4]]
    assert [c.train.micro_batch for c in cfgs] == [16, 32, 64, 16]  # not a cartesian product
    assert [c.engine.compile_mode for c in cfgs] == [None, None, None, "reduce-overhead"]
    assert [c.train.total_batch_tokens for c in cfgs] == [b * 64 * 2 * 2 for b in (16, 32, 64, 16)]  # B x T x world x accum


def test_a_failing_row_is_reported_and_the_sweep_goes_on(tmp_path):
    # A DeepSpeed JSON that does not exist passes the command line (any path is a string) and fails when the
    # engine is built; the ranks of the spawned 2-rank world agree on it, and the next row runs.
    missing = str(tmp_path / "missing.json")
    out = _tool("--model", "gpt2-tiny", "--engines", "zero1", "--world", "2", "--micro-batch", "1", "--seq-len", "16",
                "--warmup", "1", "--steps", "1", "--vary", f"engine.ds_config={missing}", "--vary", "train.micro_batch=2",
                "--json", str(tmp_path / "bench.json"), "--profile", str(tmp_path / "profile"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _rows(out.stdout)
    assert [r[0] for r in rows] == ["zero1", f"zero1 ds_config={missing}", "zero1 micro_batch=2"]
    assert rows[1][5] == f"failed: ConfigError: DeepSpeed config {missing} does not exist; pass --engine.ds_config=PATH " \
                         f"or use a file in {DS_CONFIG_DIR}"
    assert float(rows[0][5].replace(",", "")) > 0 and float(rows[2][5].replace(",", "")) > 0
    report = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert report[1]["error"].startswith("ConfigError: DeepSpeed config") and report[1]["ms_per_step"] is None


@pytest.mark.parametrize("args, message", [
    (["--engines", "ddp,zero4"], "error: argument --engines: unknown zero4"),
    (["--model", "gpt2-huge"], "unknown model"),
    (["--steps", "0"], "error: argument --steps: must be >= 1"),
    (["--data", "/nonexistent"], "no token shards: directory /nonexistent not found"),
    (["--data", "/"], "no token shards: / holds no manifest.json, so nothing was prepared there"),  # before any row, not in every row
    (["--json", ""], "--json is empty (an unset shell variable?)"),
    (["--profile", f"{__file__}/profiles"], f"--profile {__file__}/profiles: Not a directory"),
    (["--engines", "ddp,ddp"], "the rows ddp would run twice"),
    (["--vary", "train.micro_batch=2,2"], "the rows ddp micro_batch=2 would run twice"),
    (["--loss-chunk", "-1"], "error: argument --loss-chunk: must be >= 0"),
    (["--set", "engine.nope=1"], "--set engine.nope=1: unknown config key 'engine.nope'; valid keys: engine.name"),
    (["--vary", "train.micro_batch=4,abc"], "--vary train.micro_batch=4,abc: train.micro_batch must be int, got 'abc'"),
    (["--vary", "engine.compile_mode=fast"], "compile_mode must be one of null, default, reduce-overhead"),
    (["--vary", "train.micro_batch="], "expected SECTION.KEY=V1,V2,..."),
    (["--set", "compile"], "expected SECTION.KEY=VALUE"),
    (["--set", "engine.name=fsdp"], "engine.name is set by the bench; use --engines"),
    (["--model", "gpt2-tiny", "--seq-len", "16", "--vary", "train.micro_batch=0"], "row 'ddp micro_batch=0': train.micro_batch must be > 0"),
    (["--json", "/nonexistent/b.json"], "--json /nonexistent/b.json: not a file in an existing directory"),
    (["--json", "/tmp"], "--json /tmp: not a file in an existing directory"),
    (["--profile", __file__], "is a file; name a directory"),
    (["--peak-tflops", "nan"], "error: argument --peak-tflops: must be a finite number > 0, got nan"),
    (["--peak-tflops", "0"], "must be a finite number > 0"),
] + ([(["--device", "cuda"], "error: device 'cuda' was asked for but CUDA is not available here; use --device cpu or auto")]
      if not torch.cuda.is_available() else []))
def test_bad_input_is_an_error_with_exit_2(args, message, capsys):
    """In this process (a launch per case cost most of a minute): an exception other than the exit fails the test."""
    from gpt2_scale.tools import bench as bench_cli

    try:
        code = bench_cli.main(list(args))
    except SystemExit as e:  # argparse's
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert [line for line in err.splitlines() if "error: " in line] == [err.splitlines()[-1]]  # one, last


def test_outputs_replace_only_an_earlier_bench_output(tmp_path, capsys):
    """--json and --profile rewrite what an earlier bench wrote there, never a run's metrics.jsonl or a user's notes."""
    from gpt2_scale.tools import bench as bench_cli

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0, "train_loss": 10.9}\n')
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "ddp.txt").write_text("my notes\n")
    for flag, path, what in (("--json", metrics, "an earlier bench's --json"), ("--profile", tmp_path / "profile", "an earlier row's profile")):
        assert bench_cli.main(["--model", "gpt2-tiny", "--seq-len", "16", flag, str(path)]) == 2
        assert f"exists and is not {what}, which is all this replaces" in capsys.readouterr().err
    assert metrics.read_text() == '{"step": 0, "train_loss": 10.9}\n' and (tmp_path / "profile" / "ddp.txt").read_text() == "my notes\n"
    earlier = tmp_path / "bench.json"
    earlier.write_text(json.dumps(bench.to_json([], planned=2)))
    check_replaceable(earlier, bench_cli.is_bench_json, "an earlier bench's --json", "--json")  # a rerun rewrites it


def test_the_script_exits_with_the_code_main_returns():
    out = _tool("--set", "compile")
    assert out.returncode == 2 and out.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in out.stderr


def test_seq_len_beyond_the_context_is_refused():
    with pytest.raises(ValueError, match="exceeds gpt2-tiny's context length 256"):
        bench.BenchSpec("ddp", (("model.name", "gpt2-tiny"), ("train.seq_len", "512"))).config(1)


def test_loss_chunk_flag_reaches_the_engine_config():
    from gpt2_scale.tools import bench as bench_cli

    _, specs = bench_cli.parse(["--model", "gpt2-tiny", "--engines", "zero3", "--seq-len", "16", "--loss-chunk", "8"])
    assert specs[0].config(1).engine.loss_chunk == 8


@pytest.mark.parametrize("argv, message", [(["--model", "gpt2-huge"], "argument --model: unknown model 'gpt2-huge'; valid names: gpt2-124m"),
                                           (["--seq-len", "0"], "argument --seq-len: must be >= 1"),
                                           (["--model", "gpt2-tiny", "--seq-len", "300"], "--seq-len 300 exceeds gpt2-tiny's context length 256")])
def test_bench_resume_refuses_bad_flags_before_it_builds_anything(argv, message, capsys, monkeypatch):
    from gpt2_scale.tools import bench_resume

    for world in ("1", "2"):  # and refuses a launcher: each rank would save into a directory of its own
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(SystemExit) as e:
            bench_resume.main(argv if world == "1" else [])
        err = capsys.readouterr().err
        assert e.value.code == 2 and (message if world == "1" else "not under a launcher") in err.splitlines()[-1], err


@pytest.mark.parametrize("flag", ["--repeat", "--batch-size", "--seq-len", "--workers"])
def test_bench_data_refuses_a_count_below_one_naming_the_flag(flag, capsys):
    from gpt2_scale.tools import bench_data

    with pytest.raises(SystemExit) as e:
        bench_data.main([flag, "0"])
    assert e.value.code == 2 and f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_too_little_data_for_a_rows_batch_is_refused_before_any_row(corpus, capsys):
    from gpt2_scale.tools import bench as bench_cli

    args = ["--model", "gpt2-tiny", "--seq-len", "16", "--micro-batch", "4", "--vary", "train.micro_batch=1000000", "--data", str(corpus)]
    assert bench_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: row 'ddp micro_batch=1000000': the train split of {corpus} has ") and "Traceback" not in err, err
    assert "lower the batch or --seq-len, or prepare more data" in err and err.count("\n") == 1


def test_a_sweep_whose_every_row_failed_exits_1(tmp_path):
    """Nothing was measured: a script that checks the exit code must not take the table for results."""
    missing = str(tmp_path / "missing.json")
    out = _tool("--model", "gpt2-tiny", "--engines", "zero1", "--micro-batch", "1", "--seq-len", "16", "--warmup", "1", "--steps", "1",
                "--device", "cpu", "--set", f"engine.ds_config={missing}")
    assert out.returncode == 1 and "failed: ConfigError: DeepSpeed config" in out.stdout, out.stderr[-2000:]
    assert "Traceback" not in out.stderr  # bad input for the row: its line, not a traceback
