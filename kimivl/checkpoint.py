"""Checkpoint I/O in the official layout: ``config.json`` + single or sharded safetensors.

Spec: ``shared/reference/kimivl-spec.md`` §2 (key names). Loading builds the model on the meta
device, reads tensors shard by shard, checks the key set and every shape against the model and
then calls one ``load_state_dict(strict=True, assign=True)``: no random init, no second copy of
the weights. Saving writes the same layout back. Weights are only ever read as safetensors.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kimivl.errors import CheckpointError

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# Files a Kimi-VL checkpoint consists of (weights, configs, tokenizer, template).
_HUB_PATTERNS = ["*.json", "*.safetensors", "tiktoken.model", "*.jinja", "*.md"]
# Tensors kept in float32 whatever dtype the rest of the model is cast to (router selection bias:
# tiny differences in it flip expert choices).
FP32_KEYS = re.compile(r"\.e_score_correction_bias$")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_checkpoint_dir(path_or_id: str | os.PathLike[str], *, revision: str | None = None,
                           cache_dir: str | None = None) -> Path:
    """A local directory as is, or a hub id resolved through ``huggingface_hub`` (cache first)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if not _HUB_ID.match(text) or os.path.exists(text):
        raise FileNotFoundError(f"checkpoint directory {text!r} does not exist (and is not a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a core dependency
        raise ImportError("resolving a hub id needs huggingface_hub: pip install huggingface_hub") from e
    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, allow_patterns=_HUB_PATTERNS))
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set and the model is not in the local cache)" if offline else ""
        raise FileNotFoundError(f"could not resolve hub id {text!r}{hint}: {type(e).__name__}: {e}") from e


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from the index when there is one."""
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {directory}: {missing}")
        return files
    single = directory / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(p.name for p in directory.iterdir())
    pickles = [n for n in found if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    why = f"; pickle weights {pickles} are not loaded (safetensors only)" if pickles else ""
    raise CheckpointError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {directory}{why}")


def iter_checkpoint_tensors(directory: Path, *, dtype: torch.dtype | None = None,
                            device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` shard by shard; floating tensors cast to ``dtype`` one at a time."""
    for file in weight_files(directory):
        try:
            handle = safe_open(str(file), framework="pt", device=str(device))
        except Exception as e:
            raise CheckpointError(f"cannot read {file}: {e}") from e
        with handle as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point() and not FP32_KEYS.search(key):
                    tensor = tensor.to(dtype)
                yield key, tensor


def _group(keys: list[str], limit: int = 6) -> str:
    """Readable summary of many keys: grouped by their first two dotted components."""
    groups: dict[str, list[str]] = defaultdict(list)
    for k in sorted(keys):
        groups[".".join(k.split(".")[:2])].append(k)
    lines = []
    for prefix, members in groups.items():
        shown = ", ".join(members[:limit]) + (f", ... (+{len(members) - limit} more)" if len(members) > limit else "")
        lines.append(f"    {prefix}.* ({len(members)}): {shown}")
    return "\n".join(lines)


def check_state_dict(expected: dict[str, torch.Size], found: dict[str, torch.Size], source: str) -> None:
    """Raise a ``CheckpointError`` listing missing, unexpected and mis-shaped keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"    {k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
              for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or shapes):
        return
    parts = [f"checkpoint {source} does not match the model config:"]
    if missing:
        parts.append(f"  {len(missing)} missing key(s):\n{_group(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected key(s):\n{_group(unexpected)}")
    if shapes:
        parts.append(f"  {len(shapes)} shape mismatch(es):\n" + "\n".join(shapes[:20]))
    raise CheckpointError("\n".join(parts))


def load_weights(model: torch.nn.Module, directory: Path, *, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu", progress: bool = False) -> None:
    """Fill a (meta-device) model from a checkpoint directory: strict, assign, one copy."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tensors = iter_checkpoint_tensors(directory, dtype=dtype, device=device)
    if progress:
        from tqdm.auto import tqdm

        tensors = tqdm(tensors, total=len(expected), desc="loading weights", unit="tensor", leave=False)
    state = dict(tensors)
    check_state_dict(expected, {k: v.shape for k, v in state.items()}, str(directory))
    model.load_state_dict(state, strict=True, assign=True)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB' / '500MB'")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "KB": 1, "KIB": 1, "MB": 2, "MIB": 2, "GB": 3, "GIB": 3, "TB": 4, "TIB": 4}[unit]
    return int(float(m.group(1)) * base**power)


def save_weights(state_dict: dict[str, torch.Tensor], directory: Path, *, max_shard_size: int | str = "5GB") -> None:
    """Write ``model.safetensors`` or shards + ``model.safetensors.index.json`` (official layout)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("model-*-of-*.safetensors"), directory / SAFE_WEIGHTS_NAME,
                  directory / SAFE_WEIGHTS_INDEX_NAME]:
        if stale.exists():
            stale.unlink()
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=_parse_size(max_shard_size),
                                               filename_pattern="model{suffix}.safetensors")
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: state_dict[k].detach().contiguous().cpu() for k in keys}
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
