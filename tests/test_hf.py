"""Hugging Face interop: loading transformers' GPT-2 checkpoints into our GPT and exporting ours back."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from gpt2_scale import GPT, ModelConfig  # noqa: E402
from gpt2_scale.errors import UserError  # noqa: E402
from gpt2_scale.hf import HFCheckpointError, export_hf, load_hf  # noqa: E402

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=50257)


def _hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**{**TINY, **overrides})
    return transformers.GPT2LMHeadModel(cfg).eval()


def _hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def _our_logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny GPT2LMHeadModel saved with save_pretrained, and the model."""
    path = tmp_path_factory.mktemp("hf") / "tiny"
    model = _hf_model()
    model.save_pretrained(path)
    return path, model


@pytest.fixture
def idx():
    return torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))


def _copy_config(hf_dir, dest, **changes):
    dest.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def _write_weights(dest, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------ loading


def test_load_save_pretrained_matches_transformers(hf_dir, idx):
    path, hf = hf_dir
    model = load_hf(path)
    assert isinstance(model, GPT)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 4, 64)
    assert (model.config.block_size, model.config.vocab_size) == (64, 50257)
    torch.testing.assert_close(_our_logits(model, idx), _hf_logits(hf, idx), atol=1e-5, rtol=0)


def test_from_pretrained_classmethod(hf_dir, idx):
    path, hf = hf_dir
    model = GPT.from_pretrained(str(path))
    torch.testing.assert_close(_our_logits(model, idx), _hf_logits(hf, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix", [True, False])
def test_load_with_buffers_and_tied_head(tmp_path, hf_dir, idx, prefix):
    """Keys with and without `transformer.`; old mask buffers; the tied lm_head listed or not."""
    path, hf = hf_dir
    state = {k: v.clone() for k, v in hf.state_dict().items()}  # includes the tied lm_head.weight
    for i in range(TINY["n_layer"]):  # what older transformers versions saved along with the weights
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if not prefix:  # the layout of the hub's own gpt2 checkpoints (saved from GPT2Model)
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    dest = _copy_config(path, tmp_path / "ckpt")
    _write_weights(dest, state)
    model = load_hf(dest)
    torch.testing.assert_close(_our_logits(model, idx), _hf_logits(hf, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("files", [["pytorch_model.bin"], ["model-00001-of-00002.safetensors", "model.safetensors.index.json"]])
def test_other_layouts_get_one_line_saying_how_to_convert(tmp_path, hf_dir, files):
    """Only model.safetensors is read (what the hub's GPT-2 repositories and our export hold); a .bin or sharded
    checkpoint is named, with the transformers call that writes the one file."""
    dest = _copy_config(hf_dir[0], tmp_path / "ckpt")
    for name in files:
        (dest / name).write_bytes(b"x")
    with pytest.raises(HFCheckpointError) as e:
        load_hf(dest)
    msg = str(e.value)
    assert "\n" not in msg and all(name in msg for name in files) and "save_pretrained(DIR, max_shard_size=" in msg


def test_load_pad_vocab(hf_dir, idx):
    path, hf = hf_dir
    model = load_hf(path, pad_vocab=True)
    cfg = model.config
    assert cfg.pad_vocab and cfg.padded_vocab_size == 50304
    wte = model.transformer.wte.weight
    assert wte.shape == (50304, 64)
    assert torch.count_nonzero(wte[50257:]) == 0
    logits = _our_logits(model, idx)
    assert logits.shape[-1] == 50257
    torch.testing.assert_close(logits, _hf_logits(hf, idx), atol=1e-5, rtol=0)


def test_zoo_name_when_shape_matches(tmp_path):
    tiny = ModelConfig.from_name("gpt2-tiny")
    hf = _hf_model(n_layer=tiny.n_layer, n_head=tiny.n_head, n_embd=tiny.n_embd, n_positions=tiny.block_size)
    hf.save_pretrained(tmp_path)
    assert load_hf(tmp_path).config.name == "gpt2-tiny"


def test_custom_name_when_no_zoo_entry(hf_dir):
    assert load_hf(hf_dir[0]).config.name == "custom"


# ------------------------------------------------------------------------------------------- export


def test_export_round_trip(tmp_path, idx):
    torch.manual_seed(3)
    ours = GPT(ModelConfig(2, 4, 64, block_size=64, pad_vocab=True)).eval()
    with torch.no_grad():  # make the padded rows nonzero: the export must drop them, not copy them
        ours.transformer.wte.weight[50257:] = 1.0
    out = export_hf(ours, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    tensors = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied: written once
    assert tensors["transformer.wte.weight"].shape == (50257, 64)
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D (in, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["activation_function"] == "gelu_new" and cfg["tie_word_embeddings"] is True
    assert cfg["layer_norm_epsilon"] == 1e-5 and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["resid_pdrop"] == cfg["embd_pdrop"] == cfg["attn_pdrop"] == 0.0

    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    torch.testing.assert_close(_hf_logits(hf, idx), _our_logits(ours, idx), atol=1e-5, rtol=0)
    assert torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)

    back = load_hf(out)
    assert not back.config.pad_vocab
    assert torch.equal(_our_logits(back, idx), _our_logits(ours, idx))
    back_padded = load_hf(out, pad_vocab=True)
    assert torch.count_nonzero(back_padded.transformer.wte.weight[50257:]) == 0


def test_export_replaces_previous_export_and_leaves_no_temp_dirs(tmp_path, idx):
    a = GPT(ModelConfig(1, 2, 32, block_size=16, vocab_size=100))
    b = GPT(ModelConfig(1, 2, 32, block_size=16, vocab_size=100))
    out = tmp_path / "export"
    export_hf(a, out)
    export_hf(b, out)  # an export is replaced without overwrite=True
    x = idx[:, :16] % 100
    assert torch.equal(_our_logits(load_hf(out), x), _our_logits(b, x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    # Readable as config.json is (the umask's), not 0600 as safetensors makes it: others on the machine load it too.
    assert (out / "model.safetensors").stat().st_mode == (out / "config.json").stat().st_mode
    with pytest.raises(HFCheckpointError, match=f"is inside the export {re.escape(str(out))}.*outside it"):
        export_hf(b, out / "inner", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_export_refuses_foreign_non_empty_dir(tmp_path):
    model = GPT(ModelConfig(1, 2, 32, block_size=16, vocab_size=100))
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(HFCheckpointError, match="overwrite=True"):
        export_hf(model, out)
    assert (out / "notes.txt").read_text() == "keep me"
    export_hf(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    (tmp_path / "empty").mkdir()
    export_hf(model, tmp_path / "empty")  # an empty directory is fine


def test_export_never_loses_a_file_it_did_not_write_nor_a_run(tmp_path):
    """An earlier export with a file added is not replaced without overwrite=True; a directory holding a training
    run (the run being exported, or a parent of it) never is."""
    model = GPT(ModelConfig(1, 2, 32, block_size=16, vocab_size=100))
    out = tmp_path / "export"
    export_hf(model, out)
    (out / "tokenizer.json").write_text("mine")
    with pytest.raises(HFCheckpointError, match="holds other files"):
        export_hf(model, out)
    assert (out / "tokenizer.json").read_text() == "mine"
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    for target in (run, tmp_path / "runs"):
        with pytest.raises(HFCheckpointError, match=f"holds a training run \\({re.escape(str(run))}\\)"):
            export_hf(model, target, overwrite=True)
    assert (run / "metrics.jsonl").read_text() == "{}\n"
    data = tmp_path / "data" / "fineweb-edu"  # prepared shards: hours of tokenizing
    data.mkdir(parents=True)
    (data / "manifest.json").write_text("{}")
    with pytest.raises(HFCheckpointError, match=f"holds prepared token shards \\({re.escape(str(data))}\\)"):
        export_hf(model, tmp_path / "data", overwrite=True)
    assert (data / "manifest.json").read_text() == "{}"
    (run / "config.yaml").write_text("model:\n  name: gpt2-tiny\n")
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000001")
    for target in (run / "checkpoints", run / "checkpoints" / "step_00000001", run / "checkpoints" / "new"):
        with pytest.raises(HFCheckpointError, match=f"is in the training run {re.escape(str(run))}; an export never goes into"):
            export_hf(model, target, overwrite=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]


def test_an_export_records_its_run_and_replaces_only_one_of_the_same_run(tmp_path):
    model, out = GPT(ModelConfig(1, 2, 32, block_size=16, vocab_size=100)), tmp_path / "export"
    export_hf(model, out, source={"run": "/runs/a", "step": 10})
    export_hf(model, out, source={"run": "/runs/a", "step": 20})  # the same run's later step: the usual update
    marker = json.loads((out / "config.json").read_text())["gpt2_scale"]
    assert (marker["run"], marker["step"]) == ("/runs/a", 20)
    with pytest.raises(HFCheckpointError, match=r"holds the export of another run \(/runs/a, step 20\); .* pass overwrite=True"):
        export_hf(model, out, source={"run": "/runs/b", "step": 5})  # /runs/a's checkpoint may be gone: not silently
    export_hf(model, out, overwrite=True, source={"run": "/runs/b", "step": 5})
    assert json.loads((out / "config.json").read_text())["gpt2_scale"]["run"] == "/runs/b"


def test_export_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert export_hf(GPT(ModelConfig(1, 2, 32, block_size=16, vocab_size=100)), ".") == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_export_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    model = GPT(ModelConfig(1, 2, 32, block_size=16, vocab_size=100))
    out = tmp_path / "export"
    export_hf(model, out)
    before = (out / "model.safetensors").read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, out)
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (out / "model.safetensors").read_bytes() == before


def test_export_tool_names_its_overwrite_flag_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from gpt2_scale import checkpoint

    loaded = []
    model = GPT(ModelConfig(1, 2, 32, block_size=16, vocab_size=100))
    monkeypatch.setattr(checkpoint, "model_at", lambda path, meta: loaded.append(path) or model)
    monkeypatch.setattr(checkpoint, "find", lambda run_dir, step=None: Path(run_dir) / "checkpoints" / "step_00000007")
    monkeypatch.setattr(checkpoint, "read_meta", lambda path: {"step": 7})
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    from gpt2_scale.tools import export as tool

    assert tool.main([str(tmp_path / "run"), "--hf", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} is a non-empty directory") and err.count("\n") == 1
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err
    assert loaded == [] and (out / "notes.txt").read_text() == "keep me"  # failed fast, touched nothing
    (tmp_path / "file").write_text("mine")
    assert tool.main([str(tmp_path / "run"), "--hf", str(tmp_path / "file" / "export")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'file'} exists and is not a directory; choose a directory for the export\n"
    def unwritable(**_):  # a directory this user may not write in (root may write anywhere)
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr("tempfile.mkdtemp", unwritable)
        assert tool.main([str(tmp_path / "run"), "--hf", str(tmp_path / "new" / "export")]) == 2
    assert capsys.readouterr().err == f"error: cannot write the export in {tmp_path} (Permission denied); choose a directory you can write\n"
    assert loaded == []
    assert tool.main([str(tmp_path / "run"), "--hf", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_export_over_a_directory_whose_config_is_not_an_object(tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    (out / "config.json").write_text("5")
    with pytest.raises(HFCheckpointError, match="not an export of this package"):
        export_hf(GPT(ModelConfig(1, 2, 32, block_size=16, vocab_size=100)), out)


# ------------------------------------------------------------------------------------------- errors


def test_errors_are_user_errors():
    assert issubclass(HFCheckpointError, UserError) and issubclass(HFCheckpointError, ValueError)


@pytest.mark.parametrize(
    "config, message",
    [
        (b'{"model_type": "gpt2", "n_layer": 2,', "config.json is not valid JSON"),
        (b"\xff\xfe\xfd", "config.json is not valid JSON"),
        ({"n_layer": "two"}, "config.json: n_layer is 'two', expected a positive integer"),
        ({"n_layer": 2.0}, "config.json: n_layer is 2.0, expected a positive integer"),
        ({"n_head": -4}, "config.json: n_head is -4, expected a positive integer"),
        ({"n_embd": True}, "config.json: n_embd is True, expected a positive integer"),
        ({"layer_norm_epsilon": "tiny"}, "config.json: layer_norm_epsilon is 'tiny', expected a number"),
        ("directory", "cannot read .*config.json: Is a directory"),
    ],
)
def test_error_corrupt_config_names_the_file(tmp_path, hf_dir, config, message):
    dest = tmp_path / "ckpt"
    if isinstance(config, dict):
        _copy_config(hf_dir[0], dest, **config)
    elif config == "directory":
        (dest / "config.json").mkdir(parents=True)
    else:
        dest.mkdir()
        (dest / "config.json").write_bytes(config)
    shutil.copy(hf_dir[0] / "model.safetensors", dest)
    with pytest.raises(HFCheckpointError, match=message) as e:
        load_hf(dest)
    assert str(dest / "config.json") in str(e.value)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("model.safetensors", "truncated", r"could not read .*model.safetensors \(SafetensorError: .*\): it is trunc"),
        ("model.safetensors", b"", r"could not read .*model.safetensors \(SafetensorError"),
    ],
)
def test_error_corrupt_weights_is_one_line_naming_the_file(tmp_path, hf_dir, name, content, message):
    dest = _copy_config(hf_dir[0], tmp_path / "ckpt")
    if content == "truncated":
        content = (hf_dir[0] / "model.safetensors").read_bytes()[:1000]
    (dest / name).write_bytes(content)
    with pytest.raises(HFCheckpointError, match=message) as e:
        load_hf(dest)
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)


def test_error_no_weights_file(tmp_path, hf_dir):
    dest = _copy_config(hf_dir[0], tmp_path / "ckpt")
    with pytest.raises(HFCheckpointError, match="has no model.safetensors; only that one file is read"):
        load_hf(dest)


def test_error_no_config(tmp_path, hf_dir):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    shutil.copy(hf_dir[0] / "model.safetensors", dest)
    with pytest.raises(HFCheckpointError, match="no config.json"):
        load_hf(dest)


def test_error_not_gpt2(tmp_path, hf_dir):
    dest = _copy_config(hf_dir[0], tmp_path / "ckpt", model_type="bert")
    shutil.copy(hf_dir[0] / "model.safetensors", dest)
    with pytest.raises(HFCheckpointError, match="model_type is 'bert'"):
        load_hf(dest)


def test_error_unsupported_activation(tmp_path, hf_dir):
    dest = _copy_config(hf_dir[0], tmp_path / "ckpt", activation_function="relu")
    shutil.copy(hf_dir[0] / "model.safetensors", dest)
    with pytest.raises(HFCheckpointError, match="activation_function='relu'"):
        load_hf(dest)


def test_error_shape_mismatch_names_keys_shapes_and_fitting_config(tmp_path, hf_dir):
    dest = _copy_config(hf_dir[0], tmp_path / "ckpt", n_positions=128)
    shutil.copy(hf_dir[0] / "model.safetensors", dest)
    with pytest.raises(HFCheckpointError) as e:
        load_hf(dest)
    msg = str(e.value)
    assert "transformer.wpe.weight: checkpoint [64, 64], model [128, 64]" in msg
    assert "n_positions=64" in msg and "n_layer=2" in msg and "n_embd=64" in msg


def test_error_shape_mismatch_suggests_zoo_entry(tmp_path):
    tiny = ModelConfig.from_name("gpt2-tiny")
    hf = _hf_model(n_layer=tiny.n_layer, n_head=tiny.n_head, n_embd=tiny.n_embd, n_positions=tiny.block_size)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_embd": 64}))
    with pytest.raises(HFCheckpointError, match="zoo: gpt2-tiny"):
        load_hf(tmp_path)


def test_error_missing_and_unexpected_keys(tmp_path, hf_dir):
    state = load_file(str(hf_dir[0] / "model.safetensors"))
    del state["transformer.ln_f.weight"]
    state["transformer.extra.weight"] = torch.zeros(3)
    dest = _copy_config(hf_dir[0], tmp_path / "ckpt")
    _write_weights(dest, state)
    with pytest.raises(HFCheckpointError) as e:
        load_hf(dest)
    msg = str(e.value)
    assert "missing keys: transformer.ln_f.weight" in msg
    assert "unexpected keys: transformer.extra.weight" in msg


def test_error_layer_count_mismatch(tmp_path, hf_dir):
    dest = _copy_config(hf_dir[0], tmp_path / "ckpt", n_layer=3)
    shutil.copy(hf_dir[0] / "model.safetensors", dest)
    with pytest.raises(HFCheckpointError, match=r"missing keys: transformer\.h\.2\..*n_layer=2"):
        load_hf(dest)


def test_error_untied_lm_head(tmp_path, hf_dir):
    state = load_file(str(hf_dir[0] / "model.safetensors"))
    state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])
    dest = _copy_config(hf_dir[0], tmp_path / "ckpt", tie_word_embeddings=False)
    _write_weights(dest, state)
    with pytest.raises(HFCheckpointError, match="lm_head.weight that differs"):
        load_hf(dest)


def test_error_neither_dir_nor_hub_name(tmp_path):
    with pytest.raises(HFCheckpointError, match="neither a local directory nor"):
        load_hf(tmp_path / "does" / "not" / "exist")
    (tmp_path / "file").write_text("x")
    with pytest.raises(HFCheckpointError, match="is a file"):
        load_hf(tmp_path / "file")


def test_error_zoo_model_without_checkpoint():
    with pytest.raises(HFCheckpointError, match="has no pretrained checkpoint"):
        load_hf("gpt2-tiny")


# ---------------------------------------------------------------------------------------------- hub


@pytest.mark.parametrize(
    "name, repo",
    [("gpt2", "gpt2"), ("gpt2-124m", "gpt2"), ("gpt2-medium", "gpt2-medium"), ("gpt2-1558m", "gpt2-xl"),
     ("someone/my-gpt2", "someone/my-gpt2")],
)
def test_hub_offline_gives_clear_error(monkeypatch, name, repo):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def offline(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(HFCheckpointError) as e:
        load_hf(name)
    assert calls == [(repo, {"allow_patterns": ["config.json", "model.safetensors"]})]
    msg = str(e.value)
    assert f"hf download {repo}" in msg and "--local-dir DIR" in msg and "pass DIR" in msg
    assert "ConnectionError" in msg


def test_hub_repository_not_found(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    class RepositoryNotFoundError(Exception):
        pass

    def missing(repo_id, **kwargs):
        raise RepositoryNotFoundError("404")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(HFCheckpointError, match="no accessible repository 'someone/nothing'"):
        load_hf("someone/nothing")


def test_hub_download_loads_snapshot(monkeypatch, hf_dir, idx):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    path, hf = hf_dir
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(path))
    model = GPT.from_pretrained("gpt2")
    torch.testing.assert_close(_our_logits(model, idx), _hf_logits(hf, idx), atol=1e-5, rtol=0)


def test_a_run_directory_given_as_a_hugging_face_one_is_told_to_use_ckpt(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(HFCheckpointError, match="has no config.json: .*needs one \\(it is a training run's directory: pass it as --ckpt\\)"):
        GPT.from_pretrained(str(tmp_path))
