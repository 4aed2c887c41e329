"""Hugging Face interop: load GPT-2 checkpoints in Hugging Face layout, export ours to it.

The layout is a directory with ``config.json`` (``model_type: gpt2``) and the weights in one
``model.safetensors``: what the hub's GPT-2 repositories hold, what the downloader fetches and what the
export writes (other layouts get one line saying how to convert them). Hugging Face
GPT-2 stores the attention and MLP projections as ``Conv1D`` weights of shape (in, out); ours are
``nn.Linear`` weights of shape (out, in), so those are transposed both ways. Everything else maps one
to one by name (``h.0.attn.c_attn.weight`` ...), with or without the ``transformer.`` prefix.

``load_hf("gpt2")`` downloads from the hub; ``load_hf(DIR)`` reads a local directory and never touches
the network. ``export_hf(model, DIR)`` writes a directory that ``transformers.GPT2LMHeadModel
.from_pretrained(DIR)`` loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from gpt2_scale.checkpoint import enclosing_run, weights_mismatch
from gpt2_scale.errors import UserError
from gpt2_scale.fileio import nearest_existing, publish_dir
from gpt2_scale.model import GPT
from gpt2_scale.zoo import HF_HUB_NAMES, ModelConfig, available_models

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"

# Hugging Face Conv1D modules: weight stored (in, out), the transpose of nn.Linear's (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers older transformers versions saved with the weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# What our model computes; config.json fields that would make it compute something else.
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
_LAYER_NORM_EPS = 1e-5
_EXPORT_MARKER = "gpt2_scale"  # key in config.json of our exports
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HFCheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read into our model, or a hub name that cannot be fetched."""


# --------------------------------------------------------------------------------------------- load


def load_hf(name_or_dir: str | os.PathLike, pad_vocab: bool = False) -> GPT:
    """A GPT with the weights of a GPT-2 checkpoint in Hugging Face layout, in fp32 on the CPU, in eval mode.

    ``name_or_dir`` is a local directory, or a hub name: ``gpt2``, ``gpt2-medium``, ``gpt2-large``,
    ``gpt2-xl``, a zoo name that has one (``gpt2-124m`` ...), or any ``owner/repo``. With ``pad_vocab``
    the embedding gets the padded number of rows (see ``ModelConfig.pad_vocab``); the extra rows are zero.
    """
    path = _resolve(name_or_dir)
    hf_config = _read_config(path)
    config = _model_config(hf_config, pad_vocab, path / CONFIG_FILE)
    state = _read_weights(path)
    state = _normalise_keys(state, path)

    with torch.device("meta"):  # no random init of weights about to be overwritten
        model = GPT(config)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # to_empty may untie them
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    _check_keys_and_shapes(state, expected, config, path)

    with torch.no_grad():
        params = model.state_dict()
        for key, tensor in state.items():
            if key == "transformer.wte.weight":
                params[key][: config.vocab_size].copy_(tensor)
                params[key][config.vocab_size :].zero_()
            else:
                params[key].copy_(tensor)
    return model.eval()


def _resolve(name_or_dir: str | os.PathLike) -> Path:
    """The local directory holding the checkpoint, downloading it first for a hub name."""
    text = os.fspath(name_or_dir)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HFCheckpointError(f"{text} is a file; pass the directory that holds {CONFIG_FILE} and the weights")
    repo = _hub_repo(text)
    if repo is None:
        raise HFCheckpointError(
            f"{text!r} is neither a local directory nor a Hugging Face hub name "
            f"(gpt2, gpt2-medium, gpt2-large, gpt2-xl, {', '.join(sorted(HF_HUB_NAMES))} or owner/repo)"
        )
    return _download(repo, also_not_local=text if "/" in text else None)


def _hub_repo(text: str) -> str | None:
    if text in HF_HUB_NAMES.values():
        return text
    try:
        zoo_name = ModelConfig.from_name(text).name
    except ValueError:
        zoo_name = None
    if zoo_name is not None:
        if zoo_name not in HF_HUB_NAMES:
            raise HFCheckpointError(
                f"the zoo model {text!r} has no pretrained checkpoint; pretrained ones: "
                + ", ".join(f"{k} ({v})" for k, v in HF_HUB_NAMES.items())
            )
        return HF_HUB_NAMES[zoo_name]
    if _HUB_REPO.match(text) and not text.startswith((".", "~")):
        return text
    return None


def _offline_hint(repo: str) -> str:
    return (
        f"download it on a machine that has network access with `hf download {repo} {CONFIG_FILE} "
        f"{SAFETENSORS_FILE} --local-dir DIR` (older huggingface_hub: `huggingface-cli download {repo} "
        f"--include {CONFIG_FILE} {SAFETENSORS_FILE} --local-dir DIR`), copy DIR here and pass DIR instead of "
        f"the name"
    )


def _download(repo: str, also_not_local: str | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise HFCheckpointError(
            f"loading {repo!r} from the hub needs huggingface_hub (`pip install huggingface_hub`); or "
            + _offline_hint(repo)
        ) from e
    try:
        local = snapshot_download(repo, allow_patterns=[CONFIG_FILE, SAFETENSORS_FILE])
    except Exception as e:  # offline, DNS, proxy, 404, gated: all end the same way for the user
        kind = type(e).__name__
        if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            reason = f"the hub has no accessible repository {repo!r} ({kind})"
        else:
            detail = " ".join(str(e).split())
            reason = f"could not download {repo!r} from the Hugging Face hub ({kind}: {detail})"
        if also_not_local is not None:
            reason += f", and there is no local directory {also_not_local!r}"
        raise HFCheckpointError(f"{reason}; {_offline_hint(repo)}") from e
    path = Path(local)
    if not (path / SAFETENSORS_FILE).exists():
        raise HFCheckpointError(
            f"the hub repository {repo!r} has no {SAFETENSORS_FILE}; download its weights some other way "
            f"into a directory with {CONFIG_FILE} and pass that directory"
        )
    return path


def _read_json(file: Path) -> object:
    """A JSON file of the checkpoint; anything unreadable is an HFCheckpointError that names it."""
    try:
        return json.loads(file.read_bytes())
    except OSError as e:
        raise HFCheckpointError(f"cannot read {file}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not text
        raise HFCheckpointError(f"{file} is not valid JSON ({e}); download or export the checkpoint again") from None


def _read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.exists():
        run = " (it is a training run's directory: pass it as --ckpt)" if (path / "config.yaml").is_file() else ""
        raise HFCheckpointError(f"{path} has no {CONFIG_FILE}: a Hugging Face GPT-2 checkpoint needs one{run}")
    cfg = _read_json(file)
    if not isinstance(cfg, dict) or cfg.get("model_type") != "gpt2":
        got = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise HFCheckpointError(f"{file} is not a GPT-2 config: model_type is {got!r}, expected 'gpt2'")
    return cfg


def _model_config(cfg: dict, pad_vocab: bool, file: Path) -> ModelConfig:
    def field(*names):
        for n in names:
            value = cfg.get(n)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise HFCheckpointError(f"{file}: {n} is {value!r}, expected a positive integer")
                return value
        raise HFCheckpointError(f"{file} has no {' or '.join(names)}")

    epsilon = cfg.get("layer_norm_epsilon", _LAYER_NORM_EPS)
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool):
        raise HFCheckpointError(f"{file}: layer_norm_epsilon is {epsilon!r}, expected a number")

    n_layer, n_head, n_embd = field("n_layer"), field("n_head"), field("n_embd")
    block_size, vocab_size = field("n_positions", "n_ctx"), field("vocab_size")
    # Fields that would make the checkpoint compute something our model does not.
    unsupported = []
    if cfg.get("activation_function", "gelu_new") not in _ACTIVATIONS:
        unsupported.append(f"activation_function={cfg['activation_function']!r} (supported: {', '.join(_ACTIVATIONS)})")
    if abs(epsilon - _LAYER_NORM_EPS) > 1e-12:
        unsupported.append(f"layer_norm_epsilon={cfg['layer_norm_epsilon']} (supported: {_LAYER_NORM_EPS})")
    if cfg.get("n_inner") not in (None, 4 * n_embd):
        unsupported.append(f"n_inner={cfg['n_inner']} (supported: 4 * n_embd = {4 * n_embd})")
    if not cfg.get("scale_attn_weights", True):
        unsupported.append("scale_attn_weights=false")
    if cfg.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("scale_attn_by_inverse_layer_idx=true")
    if cfg.get("add_cross_attention", False):
        unsupported.append("add_cross_attention=true")
    if unsupported:
        raise HFCheckpointError(f"{file} asks for what this model does not implement: {'; '.join(unsupported)}")
    try:
        config = ModelConfig(n_layer, n_head, n_embd, block_size=block_size, vocab_size=vocab_size)
    except (TypeError, ValueError) as e:
        raise HFCheckpointError(f"{file} does not describe a valid model: {e}") from e
    zoo = _zoo_match(config)
    return (zoo or config).replace(pad_vocab=pad_vocab)


def _zoo_match(config: ModelConfig) -> ModelConfig | None:
    shape = (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size)
    for name in available_models():  # zoo names sort before aliases, so a match gets its canonical name
        entry = ModelConfig.from_name(name)
        if (entry.n_layer, entry.n_head, entry.n_embd, entry.block_size, entry.vocab_size) == shape:
            return entry
    return None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = path / SAFETENSORS_FILE
    if not file.exists():
        others = sorted(p.name for p in path.iterdir() if p.name.endswith((".bin", ".safetensors", ".index.json")))
        held = f" (it holds {', '.join(others)})" if others else ""
        raise HFCheckpointError(
            f"{path} has no {SAFETENSORS_FILE}{held}; only that one file is read: write it with transformers, "
            "GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(DIR, max_shard_size='100GB')"
        )
    try:
        return load_file(str(file))
    except Exception as e:  # a truncated or foreign file: say which one, in one line
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise HFCheckpointError(
            f"could not read {file} ({type(e).__name__}: {first}): it is truncated or not a weights file; "
            "download or export it again"
        ) from e


def _normalise_keys(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Our key names (``transformer.`` prefix, Linear layout); buffers and the tied lm_head dropped."""
    out: dict[str, torch.Tensor] = {}
    lm_head = None
    for key, tensor in state.items():
        if key == "lm_head.weight":
            lm_head = tensor
            continue
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        key = key if key.startswith("transformer.") else "transformer." + key
        if key.endswith(_CONV1D) and tensor.dim() == 2:
            tensor = tensor.t()
        out[key] = tensor
    wte = out.get("transformer.wte.weight")
    if lm_head is not None and wte is not None and lm_head.shape == wte.shape and not torch.equal(lm_head, wte):
        raise HFCheckpointError(
            f"the checkpoint in {path} has an lm_head.weight that differs from wte.weight; "
            "this model ties them, as GPT-2 does"
        )
    return out


def _fitting_config(state: dict[str, torch.Tensor]) -> str:
    """What the checkpoint's own tensors say the model is, for error messages."""
    wte, wpe = state.get("transformer.wte.weight"), state.get("transformer.wpe.weight")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    if wte is None or wpe is None or wte.dim() != 2 or wpe.dim() != 2:
        return ""
    n_layer = max(layers) + 1 if layers else 0
    fit = f"n_layer={n_layer}, n_embd={wte.shape[1]}, n_positions={wpe.shape[0]}, vocab_size={wte.shape[0]}"
    zoo = [
        name
        for name in available_models()
        if (c := ModelConfig.from_name(name)).name == name
        and (c.n_layer, c.n_embd, c.block_size, c.vocab_size) == (n_layer, wte.shape[1], wpe.shape[0], wte.shape[0])
    ]
    return f"; the weights fit a config with {fit}" + (f" (zoo: {', '.join(zoo)})" if zoo else "")


def _check_keys_and_shapes(
    state: dict[str, torch.Tensor], expected: dict[str, tuple], config: ModelConfig, path: Path
) -> None:
    expected = {**expected, "transformer.wte.weight": (config.vocab_size, config.n_embd)}  # no padded rows on disk
    problem = weights_mismatch(expected, state)
    if problem:
        raise HFCheckpointError(
            f"the weights do not match the model of config.json in {path} (n_layer={config.n_layer}, n_head="
            f"{config.n_head}, n_embd={config.n_embd}, n_positions={config.block_size}, vocab_size={config.vocab_size}), "
            f"shapes in nn.Linear (out, in) layout: {problem}{_fitting_config(state)}"
        )


# ------------------------------------------------------------------------------------------- export


def check_export_target(out_dir: str | os.PathLike, overwrite: bool, how: str = "overwrite=True", run: str | None = None) -> Path:
    """The directory an export may be written to (what ``export_hf`` checks first). A program calls it before
    loading a model, to fail fast, and names its own way to overwrite in ``how`` (e.g. ``--overwrite``).

    An earlier export is replaced without ``overwrite`` when it came from the same training ``run`` (a later step,
    say) or from no run; one of another run only with it, as that run's checkpoint may be gone."""
    out = Path(out_dir).expanduser().resolve()  # "." names the directory it is, which can be renamed into place
    existing = nearest_existing(out)  # out, or the directory it would be made in
    if inside := enclosing_run(out):  # not even with overwrite
        raise HFCheckpointError(f"{out} is in the training run {inside}; an export never goes into a run's directory (it "
                                "would replace the run's files): choose a directory outside it")
    if not existing.is_dir():
        raise HFCheckpointError(f"{existing} exists and is not a directory; choose a directory for the export")
    if outer := next((p for p in out.parents if (p / CONFIG_FILE).is_file() and _export_marker(p) is not None), None):
        raise HFCheckpointError(f"{out} is inside the export {outer}, which would then no longer be one (and replacing it "
                                "would delete this one): choose a directory outside it")
    parent = next((p for p in out.parents if p.exists()), out)  # where the export is written first (out.parent, once made)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as e:  # found now, not after minutes of loading the model
        raise HFCheckpointError(f"cannot write the export in {parent} ({e.strerror}); choose a directory you can write") from None
    marker = _export_marker(out) if out.is_dir() else None
    if out.is_dir() and any(out.iterdir()) and not overwrite and marker is None:
        raise HFCheckpointError(
            f"{out} is a non-empty directory that is not an export of this package (or holds other files too); "
            f"choose another directory or pass {how} to replace it"
        )
    for name, what in (("metrics.jsonl", "a training run"), ("manifest.json", "prepared token shards")):  # not even with overwrite
        if out.is_dir() and (held := next((p.parent for p in out.rglob(name)), None)):
            raise HFCheckpointError(f"{out} holds {what} ({held}); an export never replaces them: choose another directory")
    if run is not None and not overwrite and (marker or {}).get("run") not in (None, run):
        raise HFCheckpointError(f"{out} holds the export of another run ({marker['run']}, step {marker.get('step')}); "
                                f"choose another directory or pass {how} to replace it")
    return out


def export_hf(model: GPT, out_dir: str | os.PathLike, overwrite: bool = False, source: dict | None = None) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 checkpoint (config.json + model.safetensors) to ``out_dir``.

    The files are written to a temporary directory beside ``out_dir`` and renamed into place, so a
    failure never leaves a half-written export. An existing export is replaced; any other non-empty
    directory only with ``overwrite=True``. ``source`` ({"run": resolved run directory, "step": N}) is recorded in
    config.json, and an export of another run is replaced only with ``overwrite=True``. Returns the directory.
    """
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DDP wrapper
    out = check_export_target(out_dir, overwrite, run=(source or {}).get("run"))
    tensors = _hf_tensors(model)
    config = _hf_config(model.config, model.transformer.wte.weight.dtype)
    config[_EXPORT_MARKER].update(source or {})
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        os.chmod(tmp / SAFETENSORS_FILE, (tmp / CONFIG_FILE).stat().st_mode)  # safetensors makes it 0600, whatever the umask
        publish_dir(tmp, out, replace=True)  # an earlier export is swapped out only once this one is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights in Hugging Face's layout: Conv1D (in, out) projections, no padded vocabulary rows, the tied
    lm_head written once (as wte)."""
    wte, lm_head = model.transformer.wte.weight, model.lm_head.weight
    if lm_head is not wte and not torch.equal(lm_head, wte):
        raise HFCheckpointError("the model's lm_head.weight is not tied to wte.weight; GPT-2 checkpoints tie them")
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        tensor = tensor.detach().to("cpu")
        if key == "transformer.wte.weight":
            tensor = tensor[: model.config.vocab_size]
        elif key.endswith(_CONV1D):
            tensor = tensor.t()
        tensors[key] = tensor.contiguous().clone()
    return tensors


def _hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """transformers' GPT2Config for our model: GPT-2's architecture, and no dropout (ours has none)."""
    hf = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
        "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0,
        "layer_norm_epsilon": _LAYER_NORM_EPS, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "tie_word_embeddings": True,
        "use_cache": True, "torch_dtype": str(dtype).removeprefix("torch."),
        _EXPORT_MARKER: {"model": config.name, "pad_vocab": config.pad_vocab},
    }
    if config.vocab_size > 50256:
        hf.update(bos_token_id=50256, eos_token_id=50256)
    return hf


def _export_marker(path: Path) -> dict | None:
    """What an export of this package, and nothing else, records of itself (model, and the run and step it came from);
    None for any other directory. Replacing an export loses no file that export_hf did not write."""
    if {p.name for p in path.iterdir()} - {CONFIG_FILE, SAFETENSORS_FILE}:
        return None
    try:
        config = json.loads((path / CONFIG_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or _EXPORT_MARKER not in config:
        return None
    return config[_EXPORT_MARKER] if isinstance(config[_EXPORT_MARKER], dict) else {}
