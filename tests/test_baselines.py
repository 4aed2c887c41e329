import json
import os
import re
import subprocess
import sys

import pytest
from launch import env

from gpt2_scale import baselines
from gpt2_scale.baselines import RunError
from gpt2_scale.errors import UserError
from gpt2_scale.tools import compare_baselines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "compare_baselines.py")


def write_run(path, model="gpt2-124m", records=(), finished=True, tail=""):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"model:\n  name: {model}\ntrain:\n  max_steps: 100\n")
    with open(path / "metrics.jsonl", "w", errors="surrogateescape") as f:  # "\udcff" in tail writes byte 0xff
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)
    if finished:  # as the trainer writes it at the end of its last step
        last = max((r["step"] for r in records), default=0)
        (path / "summary.json").write_text(json.dumps({"step": last, "finished": True, "final_val_loss": 3.1}))
    return path


RECORDS = [
    {"step": 0, "tokens": 0, "train_loss": 11.0, "val_loss": 10.9, "hellaswag_acc": 0.25, "hellaswag_acc_norm": 0.24},
    {"step": 50, "tokens": 3_276_800, "train_loss": 4.0, "lr": 6e-4},
    {"step": 100, "tokens": 6_553_600, "train_loss": 3.2, "val_loss": 3.1, "hellaswag_acc": 0.29, "hellaswag_acc_norm": 0.31},
    {"step": 150, "tokens": 9_830_400, "train_loss": 3.3, "val_loss": 3.3, "hellaswag_acc": 0.27, "hellaswag_acc_norm": 0.30},
]


# --- the table ---


def test_every_number_has_a_source_and_a_sane_value():
    for ref in [*baselines.GPT2.values(), *baselines.GPT3.values()]:
        assert ref.numbers
        for metric, number in ref.numbers.items():
            assert number.source and (2 < number.value < 4 if metric == "val_loss" else 0.25 < number.value < 1)
    gpt3 = [ref.numbers["hellaswag_acc_norm"].value for ref in baselines.GPT3.values()]
    assert gpt3 == sorted(gpt3) and len(gpt3) == 8  # every size of the GPT-3 paper, growing with size
    assert "Table H.1" in baselines.format_baselines()


@pytest.mark.parametrize(
    "model, expected",
    [
        ("gpt2-124m", ["OpenAI GPT-2 124M", "GPT-3 Small (125M)"]),
        ("gpt3-125m", ["OpenAI GPT-2 124M", "GPT-3 Small (125M)"]),
        ("gpt2", ["OpenAI GPT-2 124M", "GPT-3 Small (125M)"]),  # zoo aliases resolve
        ("gpt3-760m", ["OpenAI GPT-2 774M", "GPT-3 Large (760M)"]),
        ("gpt2-xl", ["OpenAI GPT-2 1558M", "GPT-3 XL (1.3B)"]),
        ("gpt3-175b", ["GPT-3 175B"]),  # no GPT-2 that large
    ],
)
def test_models_map_to_the_baselines_of_their_size(model, expected):
    assert [ref.name for ref in baselines.comparable(model)] == expected


@pytest.mark.parametrize("model", ["gpt2-tiny", "my-own-model"])
def test_sizes_without_baseline_say_so(model):
    with pytest.raises(baselines.NoBaseline, match=f"no published baseline for '{model}'.*gpt2-124m"):
        baselines.comparable(model)


# --- runs ---


def test_compare_final_best_diff_and_beats(tmp_path):
    result = baselines.compare(baselines.load_run(write_run(tmp_path / "run", records=RECORDS)))
    assert (result["status"], result["step"], result["tokens"]) == ("finished", 150, 9_830_400)
    assert result["metrics"]["val_loss"] == {"final": 3.3, "best": 3.1, "final_step": 150}
    assert result["metrics"]["hellaswag_acc_norm"] == {"final": 0.30, "best": 0.31, "final_step": 150}
    rows = {(b["name"], b["metric"]): b for b in result["baselines"]}
    assert set(rows) == {
        ("OpenAI GPT-2 124M", "val_loss"),
        ("OpenAI GPT-2 124M", "hellaswag_acc"),
        ("OpenAI GPT-2 124M", "hellaswag_acc_norm"),
        ("GPT-3 Small (125M)", "hellaswag_acc_norm"),
    }
    loss = rows["OpenAI GPT-2 124M", "val_loss"]
    assert loss["value"] == 3.2924 and loss["diff"] == pytest.approx(3.3 - 3.2924) and not loss["beats"]
    hella = rows["OpenAI GPT-2 124M", "hellaswag_acc_norm"]
    assert hella["diff"] == pytest.approx(0.30 - 0.2955) and hella["beats"]
    gpt3 = rows["GPT-3 Small (125M)", "hellaswag_acc_norm"]
    assert gpt3["diff"] == pytest.approx(0.30 - 0.337) and not gpt3["beats"]
    assert "play.ipynb" in loss["source"] and "Brown et al. 2020" in gpt3["source"]


@pytest.mark.parametrize("summary", ['{"step": 100, "finished": true}', '{"step": 1', "[]"])
def test_a_summary_of_an_earlier_step_or_a_damaged_one_is_not_a_finish(tmp_path, summary):
    """A finished run resumed to a larger --max-steps and stopped keeps its first finish's summary.json."""
    path = write_run(tmp_path / "run", records=RECORDS)
    assert baselines.load_run(path).finished
    (path / "summary.json").write_text(summary)
    assert not baselines.load_run(path).finished


def test_truncated_last_line_is_skipped_with_a_warning_and_run_is_in_progress(tmp_path):
    path = write_run(tmp_path / "run", records=RECORDS, finished=False, tail='{"step": 200, "train_lo')
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl:5: skipped \(cut off: the run is writing it"):
        run = baselines.load_run(path)
    assert len(run.records) == 4 and not run.finished
    assert baselines.compare(run)["status"] == "in progress"
    assert run.label.endswith("(in progress)")


def test_resumed_run_keeps_the_last_value_of_a_step(tmp_path):
    again = {"step": 100, "tokens": 6_553_600, "train_loss": 3.25, "val_loss": 3.0}
    run = baselines.load_run(write_run(tmp_path / "run", records=[*RECORDS, again]))
    assert run.series("val_loss") == ([0, 100, 150], [10.9, 3.0, 3.3])


def test_tiny_model_is_reported_without_baseline(tmp_path):
    result = baselines.compare(baselines.load_run(write_run(tmp_path / "tiny", model="gpt2-tiny", records=RECORDS)))
    assert result["baselines"] == [] and "no published baseline for 'gpt2-tiny'" in result["note"]
    assert result["metrics"]["val_loss"]["best"] == 3.1
    assert "no published baseline" in baselines.format_comparison([result])


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is empty"),
        (lambda p: (p.mkdir(), (p / "config.yaml").write_text("model:\n  name: gpt2-124m\n")), "no metrics.jsonl"),
        (lambda p: write_run(p, records=[]), "no records yet"),
        (lambda p: (write_run(p, records=RECORDS), (p / "config.yaml").write_text("train: {}\n")), "no model.name"),
        (lambda p: (write_run(p, records=RECORDS), (p / "config.yaml").write_text("model: [\n")), "not valid YAML"),
    ],
)
def test_bad_run_directories_are_clear(tmp_path, setup, message):
    setup(tmp_path / "run")
    with pytest.raises(baselines.RunError, match=message):
        baselines.load_run(tmp_path / "run")


def test_errors_are_user_errors():
    assert issubclass(baselines.RunError, UserError) and issubclass(baselines.NoBaseline, UserError)


@pytest.mark.parametrize(
    "bad, why",
    [
        ('{"step": 120, "train_loss": "abc"}', "train_loss is 'abc', not a finite number"),
        ('{"step": 120, "val_loss": [3.0]}', "val_loss is [3.0], not a finite number"),
        ('{"step": 120, "hellaswag_acc_norm": true}', "hellaswag_acc_norm is True, not a finite number"),
        ('{"step": 120, "tokens": "many"}', "tokens is 'many', not a finite number"),
        ('{"step": 120, "val_loss": NaN}', "val_loss is nan, not a finite number"),  # Python's json reads and writes NaN
        ('{"step": 120, "val_loss": -Infinity}', "val_loss is -inf, not a finite number"),
        ('{"step": "120", "val_loss": 3.0}', "not a JSON record with an integer step"),
        ('[1, 2]', "not a JSON record with an integer step"),
        ("garbage \udcff", "not JSON"),
    ],
)
def test_invalid_records_are_skipped_with_a_warning_naming_the_line(tmp_path, bad, why):
    path = write_run(tmp_path / "run", records=RECORDS[:2], tail=bad + "\n" + json.dumps(RECORDS[2]) + "\n")
    with pytest.warns(RuntimeWarning, match=f"metrics.jsonl:3: skipped \\({re.escape(why)}\\)"):
        run = baselines.load_run(path)
    assert [r["step"] for r in run.records] == [0, 50, 100]
    assert baselines.compare(run)["metrics"]["val_loss"]["final"] == 3.1


def test_metrics_with_no_valid_record_say_so(tmp_path):
    path = write_run(tmp_path / "run", tail="".join(f"garbage {i}\n" for i in range(20)))
    with pytest.warns(RuntimeWarning) as caught:
        with pytest.raises(RunError, match="no valid metrics record .*all 20 lines"):
            baselines.load_run(path)
    assert len(caught) == baselines.MAX_WARNINGS + 1 and "15 more lines skipped" in str(caught[-1].message)


def test_config_that_is_not_text_is_clear(tmp_path):
    path = write_run(tmp_path / "run", records=RECORDS)
    (path / "config.yaml").write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(RunError, match="config.yaml is not valid YAML"):
        baselines.load_run(path)


# --- command line ---


def run_tool(*args, cwd):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env())


def test_command_line_table_json_and_plot(tmp_path, capsys):
    a = write_run(tmp_path / "a", records=RECORDS)
    b = write_run(tmp_path / "b", model="gpt3-125m", records=RECORDS[:3], finished=False, tail='{"step": 1')
    tiny = write_run(tmp_path / "tiny", model="gpt2-tiny", records=RECORDS)
    out = tmp_path / "curves.png"

    proc = run_tool(a, b, tiny, "--plot", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "cut off" in proc.stderr and "Traceback" not in proc.stderr
    assert "in progress" in proc.stdout and "GPT-3 Small (125M)" in proc.stdout and "no published baseline" in proc.stdout
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out.write_bytes(out.read_bytes() + b"earlier")
    assert compare_baselines.main([str(a), "--plot", str(out)]) == 0 and not out.read_bytes().endswith(b"earlier")  # a rerun replaces its plot
    thesis = tmp_path / "thesis.pdf"
    thesis.write_bytes(b"%PDF-1.5 my thesis")
    assert compare_baselines.main([str(a), "--plot", str(thesis)]) == 2 and thesis.read_bytes() == b"%PDF-1.5 my thesis"
    assert f"--plot {thesis} exists and is not an earlier plot" in capsys.readouterr().err

    assert compare_baselines.main([str(a), str(b), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in results] == ["finished", "in progress"]
    assert results[1]["metrics"]["val_loss"]["final"] == 3.1


def test_command_line_bad_input_exits_2(tmp_path, capsys):
    tool = compare_baselines
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in [([tmp_path / "missing"], "does not exist"), ([empty], "is empty"), ([], "at least one RUN_DIR")]:
        assert tool.main([str(a) for a in args]) == 2
        assert message in capsys.readouterr().err
    bad_plot = tmp_path / "no-such-dir" / "x.png"
    assert tool.main([str(write_run(tmp_path / "a", records=RECORDS)), "--plot", str(bad_plot)]) == 2
    assert "no-such-dir" in capsys.readouterr().err
    assert tool.main(["--list"]) == 0 and "Table H.1" in capsys.readouterr().out


def test_command_line_garbage_metrics_prints_warnings_then_one_error(tmp_path):
    run = write_run(tmp_path / "run", tail='{"step": 1, "train_loss": "abc"}\nnot json\n')
    proc = run_tool(run, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[:2] == [
        f"warning: {run / 'metrics.jsonl'}:1: skipped (train_loss is 'abc', not a finite number)",
        f"warning: {run / 'metrics.jsonl'}:2: skipped (cut off: the run is writing it, or was killed mid-write)",
    ]
    assert len(lines) == 3 and lines[2].startswith(f"error: {run / 'metrics.jsonl'} holds no valid metrics record")
    assert "has not logged a step" not in proc.stderr


# Without a suffix matplotlib wrote curves.png; .pgf needs LaTeX, which a machine may not have.
@pytest.mark.parametrize("name", ["curves.xyz", "curves", "run", "curves.pgf"])
def test_command_line_unknown_plot_format_is_one_line(tmp_path, capsys, name):
    run = write_run(tmp_path / "run", records=RECORDS)
    assert compare_baselines.main([str(run), "--plot", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot plot to {tmp_path / name}: give a name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_metrics_path_that_is_a_directory_and_a_finished_run_without_evaluations_say_so(tmp_path):
    run = write_run(tmp_path / "run", records=[{"step": 0, "tokens": 0, "train_loss": 11.0}])
    (run / "summary.json").write_text(json.dumps({"step": 0, "finished": True}))
    assert "(no val_loss or HellaSwag logged: the run evaluated neither)" in baselines.format_comparison([baselines.compare(baselines.load_run(run))])
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    with pytest.raises(baselines.RunError, match="metrics.jsonl is not a file"):
        baselines.load_run(run)
