import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from launch import env

from gpt2_scale.errors import UserError
from gpt2_scale.eval import hellaswag
from gpt2_scale.eval.hellaswag import HellaSwagError
from gpt2_scale.model import GPT
from gpt2_scale.tokenizer import VOCAB_SIZE, encode
from gpt2_scale.tools import eval_hellaswag
from gpt2_scale.zoo import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Five examples in the official schema (odd on purpose: 2 ranks get 3 and 2).
CONTEXTS = [
    ("Roof shingle removal", "A man is sitting on a roof.", "he"),
    ("Baking cookies", "A woman puts flour in a bowl. She adds eggs and sugar, then", "she"),
    ("Washing dishes", "The sink is full of plates.", "a boy"),
    ("Playing guitar", "A musician tunes the strings of an old guitar on a stage in front of a small crowd.", "he"),
    ("Running a marathon", "Thousands of runners line up at the start.", "the gun"),
]
ENDINGS = [
    ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
    ["mixes them with a spoon.", "flies away.", "paints the bowl blue and sings loudly to the oven.", "sleeps."],
    ["washes them one by one.", "eats the sink.", "runs.", "turns into a cloud of dust over the mountains."],
    ["plays a song.", "throws it into the sea.", "starts to play a slow tune while people clap.", "cooks."],
    ["fires and they start running.", "sings.", "is made of cheese.", "runs away."],
]


def write_examples(path, labels=(3, "0", 0, "2", 1), contexts=CONTEXTS, endings=ENDINGS):
    with open(path, "w") as f:
        for i, ((activity, ctx_a, ctx_b), ends, label) in enumerate(zip(contexts, endings, labels)):
            row = dict(ind=i, activity_label=activity, ctx_a=ctx_a, ctx_b=ctx_b, ctx=f"{ctx_a} {ctx_b}",
                       split="val", split_type="indomain", label=label, endings=ends, source_id=f"test~{i}")
            f.write(json.dumps(row) + "\n")
    return path


def tiny_model(block_size=256, seed=0):
    """Smaller than gpt2-tiny, so tests stay fast: the 50257-token output layer dominates the cost."""
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=block_size))


# --- data ---


def test_load_examples_reads_the_official_schema(tmp_path):
    examples = hellaswag.load_examples(write_examples(tmp_path / "val.jsonl"))
    assert [ex.label for ex in examples] == [3, 0, 0, 2, 1]  # string labels become ints
    assert examples[0].ctx == "A man is sitting on a roof. he"
    assert examples[0].endings == tuple(ENDINGS[0])
    assert len(hellaswag.load_examples(tmp_path / "val.jsonl", limit=2)) == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "la', "not JSON"),
        ('{"ctx": "a", "endings": ["b", "c", "d", "e"]}', "ctx, endings and label; this one lacks label"),
        ('{"label": 0}', "this one lacks ctx, endings"),
        ("[1, 2]", "a JSON object with ctx, endings and label"),
        ('{"ctx": "caf\udce9", "endings": ["b", "c", "d", "e"], "label": 0}', "not UTF-8 text"),
        ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}', "4 strings"),
        ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', "label must be 0-3"),
        ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": ""}', "test split has no labels"),
        ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1.7}', "label must be 0-3, got 1.7"),  # not scored as 1
        ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": true}', "label must be 0-3, got True"),
        ('{"ctx": "", "endings": ["b", "c", "d", "e"], "label": 1}', "ctx must be"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    path = write_examples(tmp_path / "val.jsonl")
    with open(path, "a", errors="surrogateescape") as f:  # "\udce9" writes the byte 0xe9, not UTF-8
        f.write(line + "\n")
    with pytest.raises(HellaSwagError, match=message) as info:
        hellaswag.load_examples(path)
    assert f"{path}:6" in str(info.value)
    assert issubclass(HellaSwagError, UserError) and issubclass(HellaSwagError, ValueError)


def test_missing_or_empty_files_are_clear(tmp_path):
    with pytest.raises(HellaSwagError, match="does not exist"):
        hellaswag.load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(HellaSwagError, match=f"HellaSwag file {tmp_path} is a directory"):
        hellaswag.load_examples(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(HellaSwagError, match="no HellaSwag examples"):
        hellaswag.load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(HellaSwagError, match="limit"):
        hellaswag.load_examples(tmp_path / "empty.jsonl", limit=0)


def test_download_without_network_names_data_flag(tmp_path):
    port = _free_port()  # nothing listens there: the connection is refused at once
    with pytest.raises(HellaSwagError, match="prepare_data.py hellaswag --url PATH"):
        hellaswag.download(tmp_path, url=f"http://127.0.0.1:{port}/hellaswag_val.jsonl")
    assert not (tmp_path / "hellaswag_val.jsonl").exists()


def test_a_download_that_is_not_hellaswag_is_not_cached(tmp_path):
    """A wrong URL (an error page, another file) is refused and leaves the cache empty, so the right URL works after."""
    bad, good, cache = tmp_path / "bad.jsonl", tmp_path / "good.jsonl", tmp_path / "cache"
    bad.write_text("<html>not found</html>\n")
    write_examples(good)
    with pytest.raises(HellaSwagError, match=f"file://{bad} is not HellaSwag's validation file.*not JSON.*nothing was cached"):
        hellaswag.download(cache, url=f"file://{bad}")
    assert list(cache.iterdir()) == []
    assert hellaswag.download(cache, url=f"file://{good}").read_bytes() == good.read_bytes()
    assert [p.name for p in cache.iterdir()] == ["hellaswag_val.jsonl"]


def test_none_reads_the_cached_download(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_SCALE_CACHE", str(tmp_path))
    hellaswag.cache_dir().mkdir(parents=True)
    write_examples(hellaswag.cache_dir() / "hellaswag_val.jsonl")
    assert len(hellaswag.load_examples(None)) == 5


# --- scoring ---


class UnigramStub(nn.Module):
    """Predicts the same distribution at every position: logits are `bonus` (zero but for a few tokens)."""

    def __init__(self, bonus: dict[int, float], block_size: int = 64):
        super().__init__()
        self.config = ModelConfig(1, 1, 1, block_size=block_size)
        self.logits = torch.zeros(VOCAB_SIZE)
        for token, value in bonus.items():
            self.logits[token] = value
        self.calls = 0

    def forward(self, idx, targets=None):
        self.calls += 1
        return self.logits.expand(*idx.shape, VOCAB_SIZE), None


def test_hand_computed_losses_and_acc_vs_acc_norm(tmp_path):
    # Ending 0 is one token, ending 1 three; the stub likes ending 1's tokens more (bonus 5 vs 4), so
    # ending 1 has the lower loss per token but, with three tokens, the higher sum.
    one, three = encode(" yes"), encode(" a b c")
    assert (len(one), len(three)) == (1, 3)
    stub = UnigramStub({one[0]: 4.0, **{t: 5.0 for t in three}})
    log_z = math.log(VOCAB_SIZE - 4 + math.exp(4.0) + 3 * math.exp(5.0))  # log of the softmax denominator
    loss_one, loss_three, loss_other = log_z - 4.0, log_z - 5.0, log_z  # per token
    endings = [["yes", "a b c", "x y", "no"]] * 2
    path = write_examples(tmp_path / "val.jsonl", labels=(0, 1), contexts=CONTEXTS[:2], endings=endings)
    examples = hellaswag.load_examples(path)

    tokens, targets = hellaswag.collate([hellaswag.render(ex, 64) for ex in examples])
    total, mean = hellaswag.candidate_losses(stub, tokens, targets)
    expected_total = torch.tensor([loss_one, 3 * loss_three, 2 * loss_other, loss_other] * 2)
    expected_mean = torch.tensor([loss_one, loss_three, loss_other, loss_other] * 2)
    torch.testing.assert_close(total, expected_total)
    torch.testing.assert_close(mean, expected_mean)

    # Example 0's answer is the short ending (the sum picks it), example 1's the long one (the mean does).
    result = hellaswag.evaluate(stub, examples, "cpu", batch_examples=2)
    assert result == {"acc": 0.5, "acc_norm": 0.5, "n": 2}
    only_first = hellaswag.evaluate(stub, examples[:1], "cpu")
    assert (only_first["acc"], only_first["acc_norm"]) == (1.0, 0.0)


def test_batched_losses_equal_one_candidate_at_a_time(tmp_path):
    """Padding and several examples per batch change nothing; long contexts are cut on the left."""
    examples = hellaswag.load_examples(write_examples(tmp_path / "val.jsonl"), limit=3)
    for block_size in (256, 12):
        model = tiny_model(block_size).eval()
        tokens, targets = hellaswag.collate([hellaswag.render(ex, block_size) for ex in examples])
        with torch.no_grad():
            total, mean = hellaswag.candidate_losses(model, tokens, targets)
        row = 0
        for ex in examples:
            for ending in ex.endings:
                ctx, end = encode(ex.ctx), encode(" " + ending)
                seq = (ctx + end)[-block_size:]
                assert len(seq) == min(len(ctx) + len(end), block_size)
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([seq]))[0][0], dim=-1)
                losses = [-logp[t - 1, seq[t]] for t in range(len(seq) - len(end), len(seq))]
                torch.testing.assert_close(total[row], sum(losses), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(mean[row], sum(losses) / len(end), rtol=1e-5, atol=1e-5)
                row += 1


def test_batch_size_does_not_change_the_result_and_train_mode_is_restored(tmp_path):
    examples = hellaswag.load_examples(write_examples(tmp_path / "val.jsonl"))
    model = tiny_model()
    results = [hellaswag.evaluate(model, examples, "cpu", batch_examples=b) for b in (1, 2, 5)]
    assert results[0]["n"] == 5 and results[0] == results[1] == results[2]
    assert model.training
    hellaswag.evaluate(model.eval(), examples, "cpu")
    assert not model.training


def test_bad_arguments(tmp_path):
    examples = hellaswag.load_examples(write_examples(tmp_path / "val.jsonl"))
    with pytest.raises(ValueError, match="no HellaSwag examples"):
        hellaswag.evaluate(tiny_model(), [], "cpu")
    with pytest.raises(ValueError, match="rank"):
        hellaswag.evaluate(tiny_model(), examples, "cpu", rank=2, world_size=2)
    with pytest.raises(ValueError, match="context length"):
        hellaswag.evaluate(nn.Linear(2, 2), examples, "cpu")


# --- distributed ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, data_paths, out_dir):
    torch.set_num_threads(1)  # two processes share the test machine's cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = tiny_model()
        forwards = []
        model.register_forward_pre_hook(lambda module, args: forwards.append(1))
        results = []
        for path in data_paths:
            forwards.clear()
            result = hellaswag.evaluate(model, hellaswag.load_examples(path), "cpu", rank, world_size, batch_examples=2)
            results.append({"result": result, "forwards": len(forwards)})
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    sizes = (5, 1)  # odd: ranks hold 3 and 2 examples; fewer examples than ranks: rank 1 holds none
    paths = [str(write_examples(tmp_path / f"val{n}.jsonl", contexts=CONTEXTS[:n])) for n in sizes]
    mp.spawn(_rank_main, args=(2, _free_port(), paths, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for i, (n, path) in enumerate(zip(sizes, paths)):
        expected = hellaswag.evaluate(tiny_model(), hellaswag.load_examples(path), "cpu")
        assert ranks[0][i]["result"] == ranks[1][i]["result"] == expected and expected["n"] == n
        # Every rank runs the same number of forward passes, dummy ones where it has no examples left:
        # 5 examples: 2 batches of 2 on rank 0 (3 examples) and on rank 1 (2 + a dummy); 1 example: 1 each.
        assert ranks[0][i]["forwards"] == ranks[1][i]["forwards"] == math.ceil(math.ceil(n / 2) / 2)


# --- command line ---


TOOL = os.path.join(ROOT, "tools", "eval_hellaswag.py")


def test_command_line_errors_exit_2_without_traceback(tmp_path, capsys):
    bad = write_examples(tmp_path / "bad.jsonl")
    with open(bad, "a") as f:
        f.write('{"ctx": "a", "endings": ["b", "c", "d", "e"], "la\n')
    args = ["--pretrained", "gpt2", "--data", str(bad)]
    proc = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=tmp_path, env=env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}:6: not JSON (Unterminated string starting at); expected a line of hellaswag_val.jsonl"
    ]
    tool = eval_hellaswag
    data = str(write_examples(tmp_path / "v.jsonl"))
    for argv, message in [
        (["--data", str(tmp_path / "nope.jsonl")], f"error: HellaSwag file {tmp_path / 'nope.jsonl'} does not exist"),
        (["--data", data, "--device", "nonsense"], "error: unknown device 'nonsense'"),
    ]:
        assert tool.main(["--ckpt", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    for flag in ("--limit", "--batch-examples"):  # refused before the model loads
        with pytest.raises(SystemExit) as exit_:
            tool.main(["--ckpt", str(tmp_path), "--data", data, flag, "0"])
        assert exit_.value.code == 2 and f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_command_line_reports_a_broken_checkpoint_in_one_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2", "n_layer": "two"}')
    data = str(write_examples(tmp_path / "v.jsonl"))
    assert eval_hellaswag.main(["--pretrained", str(tmp_path / "hf"), "--data", data, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'hf' / 'config.json'}: n_layer is 'two', expected a positive integer\n"


def test_command_line_evaluates_a_model(tmp_path, capsys, monkeypatch):
    tool = eval_hellaswag
    monkeypatch.setattr(tool, "load_model", lambda ckpt, pretrained: tiny_model())
    path = write_examples(tmp_path / "val.jsonl")
    assert tool.main(["--ckpt", str(tmp_path), "--data", str(path), "--limit", "3", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == hellaswag.evaluate(tiny_model(), hellaswag.load_examples(path, 3), "cpu")


def test_command_line_refuses_a_model_that_does_not_read_gpt2_tokens(tmp_path, capsys):
    """HellaSwag's text is GPT-2 BPE: a model of another vocabulary would index past its embedding (a traceback)."""
    import dataclasses

    from gpt2_scale.hf import export_hf
    from gpt2_scale.model import GPT
    from gpt2_scale.zoo import ModelConfig

    export_hf(GPT(dataclasses.replace(ModelConfig.from_name("gpt2-tiny"), vocab_size=1000, name="custom")), tmp_path / "hf")
    data = str(write_examples(tmp_path / "v.jsonl"))
    assert eval_hellaswag.main(["--pretrained", str(tmp_path / "hf"), "--data", data, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'hf'}: the model's vocabulary (1000 tokens) is not the GPT-2 tokenizer's (50257)")
    assert err.count("\n") == 1
