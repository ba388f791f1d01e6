"""Model directories in Hugging Face layout, written atomically and read back strictly.

A model dir holds `config.json` (model_type `deepseek_v3`, or `deepseek_v2` for softmax gating),
`generation_config.json` and `model.safetensors` -- or `model-0000i-of-0000n.safetensors`
shards with `model.safetensors.index.json` above `max_shard_bytes`. Tensor names are those of
DeepSeek-V3's HF checkpoints: per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`, MTP
module k at `model.layers.{num_hidden_layers + k}` with `enorm`, `hnorm`, `eh_proj`,
`shared_head.norm`, and copies of the embedding and head (`embed_tokens`, `shared_head.head`)
so that vLLM / SGLang find the MTP layer complete. See docs/checkpoint.md.

Reading accepts our dirs and those written by transformers' `save_pretrained` (stacked
`mlp.experts.gate_up_proj` / `down_proj`), sharded or not, in any float dtype.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .io import TMP_MARK, atomic_dir, model_dir
from .model import Transformer

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 2**30


class CheckpointError(RuntimeError):
    """A model dir is missing, incomplete or does not match its config; the message names the file."""


# ---- names ------------------------------------------------------------------------------------

def _hf_layer_prefix(name: str, L: int) -> tuple[str, str]:
    """Split an internal name into its HF prefix and the rest: ('model.layers.3.', 'mlp.gate.weight')."""
    m = re.match(r"layers\.(\d+)\.(.*)", name)
    if m:
        return f"model.layers.{m[1]}.", m[2]
    m = re.match(r"mtp\.(\d+)\.(block\.)?(.*)", name)
    if m:
        return f"model.layers.{L + int(m[1])}.", m[3]
    raise KeyError(name)


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict under DeepSeek-V3 HF checkpoint names (experts split one tensor per expert)."""
    cfg = model.cfg
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[name] = t
        elif name in ("embed_tokens.weight", "norm.weight"):
            out["model." + name] = t
        else:
            prefix, rest = _hf_layer_prefix(name, L)
            if rest == "mlp.experts.gate_up_proj":
                gate, up = t.chunk(2, dim=1)  # (E, I, D) each
                for e in range(t.shape[0]):
                    out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate[e]
                    out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up[e]
            elif rest == "mlp.experts.down_proj":
                for e in range(t.shape[0]):
                    out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = t[e]
            else:
                out[prefix + rest] = t
    sd = model.state_dict()
    for k in range(cfg.num_nextn_predict_layers):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = sd["embed_tokens.weight"]
        out[f"model.layers.{L + k}.shared_head.head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _internal_name(hf: str, L: int, D: int) -> str | None:
    """HF name -> our name; None for tensors we read but do not keep (the MTP's shared copies)."""
    if hf == "lm_head.weight":
        return hf
    if hf in ("model.embed_tokens.weight", "model.norm.weight"):
        return hf[len("model."):]
    m = re.match(r"model\.layers\.(\d+)\.(.*)", hf)
    if not m:
        raise KeyError(hf)
    i, rest = int(m[1]), m[2]
    if i < L:
        return f"layers.{i}.{rest}"
    k = i - L
    if k >= D:
        raise KeyError(hf)
    if rest in ("embed_tokens.weight", "shared_head.head.weight"):
        return None
    if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head"):
        return f"mtp.{k}.{rest}"
    return f"mtp.{k}.block.{rest}"


# ---- reading ----------------------------------------------------------------------------------

def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).exists():
                raise CheckpointError(f"{index}: lists shard {f}, which is missing from {path}")
        return [path / f for f in files]
    if (path / WEIGHTS).exists():
        return [path / WEIGHTS]
    raise CheckpointError(f"{path}: no {WEIGHTS} or {INDEX}; is this a model dir?")


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Every tensor of a model dir as (name, tensor, file), with errors that name the file."""
    for f in _weight_files(path):
        try:
            handle = safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from None
        with handle:
            for name in handle.keys():
                try:
                    t = handle.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{f}: tensor {name} cannot be read (truncated or corrupt?): {e}") from None
                yield name, t, f


def _check_dir(path: Path) -> None:
    if TMP_MARK in path.name:
        raise CheckpointError(f"{path}: an unfinished write (temporary dir), not a model dir")
    if not path.is_dir():
        old = list(path.parent.glob(f".{path.name}.old-*")) if path.parent.exists() else []
        hint = f" (a replaced copy remains at {old[0]})" if old else ""
        raise CheckpointError(f"{path}: model dir not found{hint}")


def load_state_dict(path: str | os.PathLike, cfg: ModelConfig, reference: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """Read a model dir into our state dict names, checking names and shapes against `reference`."""
    path = Path(path)
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    sd: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, int, str], torch.Tensor] = {}  # (layer prefix, expert, proj) -> tensor
    for hf, t, f in iter_tensors(path):
        if not t.is_floating_point():
            raise CheckpointError(f"{f}: tensor {hf} has dtype {t.dtype}; expected a float dtype")
        try:
            name = _internal_name(hf, L, D)
        except KeyError:
            raise CheckpointError(f"{f}: unexpected tensor {hf} (not part of a model with "
                                  f"{L} layers and {D} MTP modules)") from None
        if name is None:
            continue
        m = re.match(r"(.*mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
        if m:
            experts[(m[1], int(m[2]), m[3])] = t
            continue
        if name not in reference:
            raise CheckpointError(f"{f}: unexpected tensor {hf}")
        if tuple(t.shape) != tuple(reference[name].shape):
            raise CheckpointError(f"{f}: tensor {hf} has shape {tuple(t.shape)}, expected "
                                  f"{tuple(reference[name].shape)} from config.json")
        sd[name] = t
    for prefix in sorted({p for p, _, _ in experts}):
        E = cfg.n_routed_experts
        for e in range(E):
            for proj in ("gate", "up", "down"):
                if (prefix, e, proj) not in experts:
                    raise CheckpointError(f"{path}: missing tensor "
                                          f"{_hf_expert_name(prefix, e, proj, L)}")
        gate_up = torch.stack([torch.cat((experts[(prefix, e, "gate")], experts[(prefix, e, "up")]))
                               for e in range(E)])
        down = torch.stack([experts[(prefix, e, "down")] for e in range(E)])
        for name, t in ((f"{prefix}.gate_up_proj", gate_up), (f"{prefix}.down_proj", down)):
            if name not in reference or tuple(t.shape) != tuple(reference[name].shape):
                want = tuple(reference[name].shape) if name in reference else "no such tensor"
                raise CheckpointError(f"{path}: experts of {_hf_expert_name(prefix, 0, 'gate', L)[:-22]} "
                                      f"stack to {tuple(t.shape)}, expected {want}")
            sd[name] = t
    if cfg.tie_word_embeddings and "lm_head.weight" not in sd and "embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    missing = [n for n in reference if n not in sd]
    if missing:
        shown = ", ".join(_hf_display(n, L) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {shown}{more}")
    return sd


def _hf_expert_name(prefix: str, e: int, proj: str, L: int) -> str:
    hf_prefix, rest = _hf_layer_prefix(prefix + ".x", L)
    return f"{hf_prefix}{rest[:-2]}.{e}.{proj}_proj.weight"


def _hf_display(name: str, L: int) -> str:
    if name in ("lm_head.weight",):
        return name
    if name in ("embed_tokens.weight", "norm.weight"):
        return "model." + name
    prefix, rest = _hf_layer_prefix(name, L)
    return prefix + rest


def _mtp_layers_present(path: Path, cfg: ModelConfig) -> int:
    """How many leading MTP modules (layers L, L+1, ...) have weights in the dir."""
    layers = set()
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as handle:
                names = list(handle.keys())
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from None
        layers.update(int(m[1]) for m in map(re.compile(r"model\.layers\.(\d+)\.").match, names) if m)
    k = 0
    while cfg.num_hidden_layers + k in layers:
        k += 1
    return k


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' is the first GPU when torch sees one, else the CPU; otherwise a torch device name, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: '{name}' is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}); use cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: nanoseek runs on cpu or cuda")
    return device


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Transformer:
    """Load a model dir (ours or transformers') into a Transformer in eval mode.

    A training run dir whose final model is not written yet loads its newest committed checkpoint.
    """
    _check_dir(Path(path))
    path = model_dir(path)
    try:
        cfg = ModelConfig.from_json(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    present = _mtp_layers_present(path, cfg)
    if present < cfg.num_nextn_predict_layers:
        # transformers' save_pretrained keeps num_nextn_predict_layers but drops the MTP weights
        warnings.warn(f"{path}: config.json declares {cfg.num_nextn_predict_layers} MTP module(s) but the "
                      f"weights hold {present}; loading with num_nextn_predict_layers={present}")
        cfg = cfg.replace(num_nextn_predict_layers=present)
    model = Transformer(cfg)
    sd = load_state_dict(path, cfg, model.state_dict())
    model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype).eval()


# ---- writing ----------------------------------------------------------------------------------

def generation_config(cfg: ModelConfig) -> dict:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "do_sample": True, "temperature": 0.6, "top_p": 0.95}


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_model(model: Transformer, path: Path, dtype: torch.dtype | None = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, extra_files: dict[str, str | bytes] | None = None) -> None:
    """Write the files of an HF model dir into an existing (temporary) dir `path`."""
    tensors = {k: (v if dtype is None else v.to(dtype)).detach().cpu() for k, v in
               to_hf_state_dict(model).items()}
    # expert slices and the MTP's embedding/head copies share storage; safetensors wants each
    # tensor in a buffer of its own
    seen: set[int] = set()
    for k, v in tensors.items():
        if v.untyped_storage().data_ptr() in seen:
            tensors[k] = v.clone()
        seen.add(tensors[k].untyped_storage().data_ptr())
    shards = _shards(tensors, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / WEIGHTS), metadata=meta)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(path / fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": weight_map}, indent=2))
    config = model.cfg.to_hf_dict()
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation_config(model.cfg), indent=2) + "\n")
    for name, content in (extra_files or {}).items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(path / name, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as fh:
            fh.write(content)


def save_model(model: Transformer, path: str | os.PathLike, dtype: torch.dtype | None = None,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, extra_files: dict[str, str | bytes] | None = None
               ) -> Path:
    """Write `model` as an HF model dir at `path`, atomically: a temporary dir, then a rename."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_model(model, tmp, dtype, max_shard_bytes, extra_files)
    return path
