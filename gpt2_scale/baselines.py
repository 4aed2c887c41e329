"""Published GPT-2 and GPT-3 numbers, each with its source, and the comparison of runs against them.

A run is compared with the OpenAI GPT-2 checkpoint and the GPT-3 paper model of its size
(gpt2-124m and gpt3-125m with GPT-2 124M and GPT-3 Small, and so on up the zoo).

HellaSwag numbers are completion style (see gpt2_scale/eval/hellaswag.py): ``hellaswag_acc_norm``
picks the ending of lowest mean loss per token, which is also how the GPT-3 paper scores HellaSwag
(section 2.4: per-token likelihood), so the seed compares its acc_norm with GPT-3's accuracy and so
do we. Where the seed's hellaswag.py publishes its own result (124M, 1558M) we use it; the plot in
the seed's play.ipynb draws 0.294463 and 0.488946 there instead (the same method, run in llm.c).
The EleutherAI harness scores multiple-choice style, so its numbers are listed, never compared.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from gpt2_scale.errors import UserError
from gpt2_scale.fileio import write_atomic
from gpt2_scale.zoo import ModelConfig

SEED_HELLASWAG = "karpathy/build-nanogpt hellaswag.py, module docstring (completion style, all 10,042 val examples)"
SEED_PLOT = "karpathy/build-nanogpt play.ipynb, hella2_baseline (same values: karpathy/llm.c dev/vislog.ipynb)"
SEED_LOSS = "karpathy/build-nanogpt play.ipynb, loss_baseline (FineWeb-Edu sample-10BT, first shard as val)"
HARNESS = "EleutherAI lm-evaluation-harness (multiple-choice style), quoted in karpathy/build-nanogpt hellaswag.py"
GPT3_PAPER = "Brown et al. 2020, Language Models are Few-Shot Learners (arXiv:2005.14165), Table H.1, zero-shot"

# metric -> True when lower is better; only these are compared with a run.
COMPARED = {"val_loss": True, "hellaswag_acc_norm": False, "hellaswag_acc": False}
# The fields of a metrics record that are read as numbers (compared, plotted or summed).
NUMERIC = ("tokens", "train_loss", *COMPARED)


@dataclass(frozen=True)
class Number:
    value: float
    source: str


@dataclass(frozen=True)
class Reference:
    name: str
    numbers: dict[str, Number]  # metric -> published number


def _gpt2(size: str, **numbers: Number) -> Reference:
    return Reference(f"OpenAI GPT-2 {size}", numbers)


def _gpt3(name: str, hellaswag_percent: float) -> Reference:
    return Reference(f"GPT-3 {name}", {"hellaswag_acc_norm": Number(hellaswag_percent / 100, GPT3_PAPER)})


GPT2 = {
    "gpt2-124m": _gpt2(
        "124M",
        val_loss=Number(3.2924, SEED_LOSS),
        hellaswag_acc=Number(0.2859, SEED_HELLASWAG),
        hellaswag_acc_norm=Number(0.2955, SEED_HELLASWAG),
        harness_acc=Number(0.2892, HARNESS),
        harness_acc_norm=Number(0.3114, HARNESS),
    ),
    "gpt2-350m": _gpt2("350M", hellaswag_acc_norm=Number(0.375224, SEED_PLOT)),
    "gpt2-774m": _gpt2("774M", hellaswag_acc_norm=Number(0.431986, SEED_PLOT)),
    "gpt2-1558m": _gpt2(
        "1558M",
        hellaswag_acc=Number(0.3842, SEED_HELLASWAG),
        hellaswag_acc_norm=Number(0.4893, SEED_HELLASWAG),
        harness_acc=Number(0.4004, HARNESS),
        harness_acc_norm=Number(0.5089, HARNESS),
    ),
}
GPT3 = {
    "gpt3-125m": _gpt3("Small (125M)", 33.7),
    "gpt3-350m": _gpt3("Medium (350M)", 43.6),
    "gpt3-760m": _gpt3("Large (760M)", 51.0),
    "gpt3-1.3b": _gpt3("XL (1.3B)", 54.7),
    "gpt3-2.7b": _gpt3("2.7B", 62.8),
    "gpt3-6.7b": _gpt3("6.7B", 67.4),
    "gpt3-13b": _gpt3("13B", 70.9),
    "gpt3-175b": _gpt3("175B", 78.9),
}
# zoo model -> (GPT-2 checkpoint, GPT-3 model) of the same size; GPT-2 stops at 1558M.
_SAME_SIZE = {
    **dict.fromkeys(["gpt2-124m", "gpt3-125m"], ("gpt2-124m", "gpt3-125m")),
    **dict.fromkeys(["gpt2-350m", "gpt3-350m"], ("gpt2-350m", "gpt3-350m")),
    **dict.fromkeys(["gpt2-774m", "gpt3-760m"], ("gpt2-774m", "gpt3-760m")),
    **dict.fromkeys(["gpt2-1558m", "gpt3-1.3b"], ("gpt2-1558m", "gpt3-1.3b")),
    **{name: (None, name) for name in ["gpt3-2.7b", "gpt3-6.7b", "gpt3-13b", "gpt3-175b"]},
}


class NoBaseline(UserError, ValueError):
    """The model has no published model of its size to compare with (tiny and custom models)."""


class RunError(UserError, ValueError):
    """A run directory that cannot be read, or a plot that cannot be written; the message says what is wrong."""


def comparable(model_name: str) -> list[Reference]:
    """The GPT-2 checkpoint and the GPT-3 model of the same size as ``model_name`` (a zoo name or alias)."""
    try:
        name = ModelConfig.from_name(model_name).name
    except ValueError:
        name = model_name
    if name not in _SAME_SIZE:
        raise NoBaseline(
            f"no published baseline for {model_name!r}: baselines exist for {', '.join(sorted(_SAME_SIZE))}"
        )
    gpt2, gpt3 = _SAME_SIZE[name]
    return [GPT2[gpt2], GPT3[gpt3]] if gpt2 else [GPT3[gpt3]]


def format_baselines() -> str:
    """Every published number with its source, one per line."""
    lines = [f"{'model':<22} {'metric':<18} {'value':>8}  source"]
    for ref in [*GPT2.values(), *GPT3.values()]:
        for metric, number in ref.numbers.items():
            lines.append(f"{ref.name:<22} {metric:<18} {number.value:>8.4f}  {number.source}")
    return "\n".join(lines)


# --- runs ---


@dataclass
class Run:
    path: Path
    model: str  # the zoo name, config.yaml's model.name
    records: list[dict]  # the lines of metrics.jsonl that parsed, in file order
    finished: bool  # summary.json exists

    @property
    def label(self) -> str:
        return str(self.path) + ("" if self.finished else " (in progress)")

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """(steps, values) sorted by step; a step logged twice (a resumed run) keeps its last value."""
        by_step = {r["step"]: r[metric] for r in self.records if r.get(metric) is not None}
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]


MAX_WARNINGS = 5  # skipped lines named per metrics file


def _is_number(value: object) -> bool:
    """A finite int or float: a NaN would otherwise win or lose every "best" and make --json's output invalid JSON."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _record_problem(record: object) -> str | None:
    """Why a parsed line is not a record this module can use, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
        return "not a JSON record with an integer step"
    for key in NUMERIC:
        if record.get(key) is not None and not _is_number(record[key]):
            return f"{key} is {record[key]!r}, not a finite number"
    return None


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A line that is not a valid record (a run killed mid-write, a hand edit)
    is skipped with a warning naming file:line; a file with lines but no valid record is a RunError."""
    records, skipped = [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()  # bad bytes: a line that fails below
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            why = "cut off: the run is writing it, or was killed mid-write" if lineno == len(lines) else "not JSON"
        else:
            why = _record_problem(record)
        if why:
            skipped.append(f"{path}:{lineno}: skipped ({why})")
        else:
            records.append(record)
    for message in skipped[:MAX_WARNINGS]:  # a few name the lines; a garbage file must not flood the terminal
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    if len(skipped) > MAX_WARNINGS:
        warnings.warn(f"{path}: {len(skipped) - MAX_WARNINGS} more lines skipped", RuntimeWarning, stacklevel=2)
    if not records and any(line.strip() for line in lines):
        raise RunError(
            f"{path} holds no valid metrics record (all {len(skipped)} lines skipped): pass a run directory whose "
            "metrics.jsonl the trainer wrote"
        )
    return records


def load_run(run_dir: str | os.PathLike) -> Run:
    """A run directory written by the trainer: config.yaml, metrics.jsonl and, once finished, summary.json."""
    path = Path(run_dir)
    expected = "a run directory holds config.yaml and metrics.jsonl, written by the trainer"
    if not path.is_dir():
        raise RunError(f"run directory {path} does not exist" if not path.exists() else f"{path} is not a directory")
    if not any(path.iterdir()):
        raise RunError(f"run directory {path} is empty ({expected}); has the run started?")
    for name in ("config.yaml", "metrics.jsonl"):
        if (path / name).exists() and not (path / name).is_file():
            raise RunError(f"{path / name} is not a file ({expected})")
        if not (path / name).is_file():
            raise RunError(f"{path} has no {name} ({expected})")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunError(f"{path / 'config.yaml'} is not valid YAML: {' '.join(str(e).split())}") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise RunError(f"{path / 'config.yaml'} has no model.name (the zoo name of the model, e.g. gpt2-124m)")
    records = read_metrics(path / "metrics.jsonl")
    if not records:
        raise RunError(f"{path / 'metrics.jsonl'} has no records yet: the run has not logged a step")
    return Run(path, model["name"], records, finished=_finished(path / "summary.json", records))


def _finished(summary_file: Path, records: list[dict]) -> bool:
    """Whether the run's summary stands for its last logged step: a resume to a larger --max-steps that was
    stopped leaves the earlier finish's summary.json behind, and a damaged one says nothing."""
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    return isinstance(summary, dict) and summary.get("finished") is True and summary.get("step") == max(steps, default=None)


def compare(run: Run) -> dict:
    """The run's final and best values of the compared metrics, and each against the same-size baselines."""
    result = {
        "run": str(run.path),
        "model": run.model,
        "status": "finished" if run.finished else "in progress",
        "step": max(r["step"] for r in run.records),
        "tokens": max((r["tokens"] for r in run.records if isinstance(r.get("tokens"), (int, float))), default=None),
        "metrics": {},
        "baselines": [],
        "note": None,
    }
    for metric, lower_is_better in COMPARED.items():
        steps, values = run.series(metric)
        if values:
            best = min(values) if lower_is_better else max(values)
            result["metrics"][metric] = {"final": values[-1], "best": best, "final_step": steps[-1]}
    try:
        references = comparable(run.model)
    except NoBaseline as e:
        result["note"] = str(e)
        references = []
    for ref in references:
        for metric, number in ref.numbers.items():
            if metric in COMPARED and metric in result["metrics"]:
                final = result["metrics"][metric]["final"]
                beats = final < number.value if COMPARED[metric] else final > number.value
                result["baselines"].append(
                    dict(name=ref.name, metric=metric, value=number.value, source=number.source,
                         diff=final - number.value, beats=beats)
                )
    return result


def _human(n: float | None) -> str:
    if n is None:
        return "? tokens"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix} tokens"
    return f"{n:.0f} tokens"


def format_comparison(results: list[dict]) -> str:
    """The table people read: one block per run, then the sources of the baselines it cites."""
    sources: list[str] = []
    out = []
    for r in results:
        out.append(f"{r['run']}: {r['model']}, step {r['step']}, {_human(r['tokens'])}, {r['status']}")
        out.append(f"  {'metric':<19} {'final':>7} {'best':>7}  {'baseline':<22} {'value':>7} {'diff':>8}  beats")
        for metric, m in r["metrics"].items():
            rows = [b for b in r["baselines"] if b["metric"] == metric]
            for b in rows or [None]:
                head = f"  {metric:<19} {m['final']:>7.4f} {m['best']:>7.4f}"
                if b is None:
                    out.append(f"{head}  -")
                    continue
                if b["source"] not in sources:
                    sources.append(b["source"])
                ref = f"{b['name']} [{sources.index(b['source']) + 1}]"
                out.append(f"{head}  {ref:<22} {b['value']:>7.4f} {b['diff']:>+8.4f}  {'yes' if b['beats'] else 'no'}")
        if not r["metrics"]:
            out.append("  (no val_loss or HellaSwag logged" + (": the run evaluated neither)" if r["status"] == "finished" else " yet)"))
        if r["note"]:
            out.append(f"  {r['note']}")
        out.append("")
    out += ["sources:"] * bool(sources) + [f"  [{i}] {s}" for i, s in enumerate(sources, 1)]
    return "\n".join(out).rstrip()


# The formats matplotlib marks as its own (a rerun may replace only its earlier plot), less pgf, which needs LaTeX.
PLOT_FORMATS = ("eps", "pdf", "png", "ps", "svg")


def plot_format(out_path: str | os.PathLike) -> str:
    """The format a plot to ``out_path`` is written in, from its suffix (without one matplotlib would add one)."""
    suffix = Path(out_path).suffix.lstrip(".").lower()
    if suffix not in PLOT_FORMATS or Path(out_path).is_dir():
        raise RunError(f"cannot plot to {out_path}: give a name ending in .{', .'.join(PLOT_FORMATS)}")
    return suffix


def plot(runs: list[Run], out_path: str | os.PathLike) -> None:
    """Two panels as in the seed's play.ipynb: losses with the GPT-2 checkpoint's val loss, HellaSwag with
    the GPT-2 and GPT-3 lines. Several runs overlay, one colour each."""
    suffix = plot_format(out_path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (ax_loss, ax_hella) = plt.subplots(1, 2, figsize=(16, 6))
    for i, run in enumerate(runs):
        for ax, metric, label, style in (
            (ax_loss, "train_loss", f"{run.label} train loss", dict(alpha=0.35)),
            (ax_loss, "val_loss", f"{run.label} val loss", dict(marker=".")),
            (ax_hella, "hellaswag_acc_norm", run.label, dict(marker=".")),
        ):
            steps, values = run.series(metric)
            if values:
                ax.plot(steps, values, color=f"C{i}", label=label, **style)
    sizes = {}  # one set of baseline lines per model size, in its own line style
    for run in runs:
        try:
            references = comparable(run.model)
        except NoBaseline:
            continue
        sizes.setdefault(tuple(ref.name for ref in references), references)
    for style, references in zip(itertools.cycle(["--", ":", "-.", (0, (5, 5))]), sizes.values()):
        for ref in references:
            color = "r" if ref.name.startswith("OpenAI GPT-2") else "g"
            if "val_loss" in ref.numbers:
                label = f"{ref.name} checkpoint val loss"
                ax_loss.axhline(ref.numbers["val_loss"].value, color=color, linestyle=style, label=label)
            if "hellaswag_acc_norm" in ref.numbers:
                ax_hella.axhline(ref.numbers["hellaswag_acc_norm"].value, color=color, linestyle=style, label=ref.name)
    for ax, title, ylabel in ((ax_loss, "Loss", "loss"), (ax_hella, "HellaSwag (acc_norm)", "accuracy")):
        ax.set(title=title, xlabel="steps", ylabel=ylabel, yscale="log" if ax is ax_loss else "linear")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    plain = matplotlib.ticker.FormatStrFormatter("%g")  # 3, 4, 6 rather than 3x10^0 on the log axis
    ax_loss.yaxis.set_major_formatter(plain)
    ax_loss.yaxis.set_minor_formatter(plain)
    fig.tight_layout()
    image = io.BytesIO()
    try:
        fig.savefig(image, format=suffix, dpi=100)
    finally:
        plt.close(fig)
    try:
        write_atomic(out_path, image.getvalue())  # an interrupted save leaves the earlier plot, not half of one
    except OSError as e:
        raise RunError(f"cannot write the plot {out_path}: {e.strerror or e}") from None
