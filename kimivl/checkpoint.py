"""Checkpoint I/O in the official layout: ``config.json`` + single or sharded safetensors.

Spec: ``shared/reference/kimivl-spec.md`` §2 (key names). Loading builds the model on the meta
device, reads tensors shard by shard, checks the key set and every shape against the model and
then calls one ``load_state_dict(strict=True, assign=True)``: no random init, no second copy of
the weights. Saving writes the same layout back. Weights are only ever read as safetensors.

Each tensor is read with plain file reads straight into memory the model then owns (or, when a dtype
or device change is asked for, into a scratch buffer it is converted from), so the peak resident
memory of a load is the loaded weights plus one tensor. ``safetensors.safe_open`` is not used for
loading: its tensors are views of a private ``mmap`` of the whole file, so one tensor kept as is (the
float32 router bias during a bf16 -> fp32 load) keeps every page of its shard that the conversion
touched resident (1.19x the fp32 weights on the real-width slice, against 1.04x now), an unconverted
load is only faulted in by the first forward, and rewriting a checkpoint file in place under a running
model changes its weights (or kills it with SIGBUS if the file shrinks). ``benchmarks/bench_load.py``
measures the peak.
"""
from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import save_file

from kimivl.errors import CheckpointError

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# Files a Kimi-VL checkpoint consists of (weights, configs, tokenizer, template).
_HUB_PATTERNS = ["*.json", "*.safetensors", "tiktoken.model", "*.jinja", "*.md"]
# Tensors kept in float32 whatever dtype the rest of the model is cast to (router selection bias:
# tiny differences in it flip expert choices; an int8 layer's per-row scales).
FP32_KEYS = re.compile(r"\.(e_score_correction_bias|weight_scale)$")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_checkpoint_dir(path_or_id: str | os.PathLike[str], *, revision: str | None = None,
                           cache_dir: str | None = None) -> Path:
    """A local directory as is, or a hub id resolved through ``huggingface_hub`` (cache first)."""
    if not isinstance(path_or_id, (str, os.PathLike)):  # e.g. None: pathlib's TypeError would name no argument
        raise TypeError(f"a checkpoint directory or a hub id like 'org/name' is needed, got {path_or_id!r}")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.is_file():
        raise FileNotFoundError(f"checkpoint directory {text!r} is a file, not a directory: pass the directory that "
                                f"holds it ({str(path.parent)!r})")
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


# safetensors dtype names (the format's header) -> torch dtypes this torch build has.
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
        "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
        "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
    }.items() if hasattr(torch, attr)
}
_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


def read_safetensors_header(f: BinaryIO, file: Path
                            ) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]]]:
    """Parse and validate a safetensors header: (data start, key -> (dtype, shape, begin, end)), in file order."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"cannot read {file}: shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, size - 8):
        raise CheckpointError(f"cannot read {file}: header length {n} is impossible for a {size}-byte file")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: the safetensors header is not JSON ({e})") from e
    start, entries = 8 + n, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"cannot read {file}: tensor {key!r} has an unsupported or malformed "
                                  f"header entry {info!r}") from e
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= size - start or end - begin != nbytes:
            raise CheckpointError(f"cannot read {file}: tensor {key!r} ({info['dtype']} {shape}) has data offsets "
                                  f"[{begin}, {end}] that do not fit its size ({nbytes} bytes) or the file")
        entries[key] = (dtype, shape, begin, end)
    return start, dict(sorted(entries.items(), key=lambda kv: kv[1][2]))


def _read_into(f: BinaryIO, offset: int, tensor: torch.Tensor, file: Path, key: str) -> None:
    """Fill ``tensor`` (contiguous, CPU) with the bytes at ``offset``; loops since one read() may return less."""
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
    f.seek(offset)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise CheckpointError(f"cannot read {file}: tensor {key!r} is truncated")
        done += got


def iter_checkpoint_tensors(directory: Path, *, dtype: torch.dtype | None = None,
                            device: torch.device | str = "cpu",
                            transient: frozenset[str] | set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` shard by shard, in file order; floating tensors cast to ``dtype`` one at a time.

    A tensor that needs no change is read straight into the memory it keeps; any other is read into one
    reused scratch buffer and converted from there. (A fresh scratch per tensor would interleave freed
    holes with the kept tensors on the heap: +4 % resident memory on a bf16 -> fp32 load of the slice.)
    Keys in ``transient`` are yielded as stored, on the CPU, as views of that scratch buffer: the consumer must be
    done with each before asking for the next (what quantizing on load does: only its int8 result is kept).
    """
    if sys.byteorder != "little":  # safetensors stores little-endian bytes; they are copied as they are
        raise CheckpointError("loading safetensors needs a little-endian host")
    device = torch.device(device)
    scratch = torch.empty(0, dtype=torch.uint8)
    for file in weight_files(directory):
        try:
            f = open(file, "rb", buffering=0)  # unbuffered: large reads go straight into the tensor
        except OSError as e:
            raise CheckpointError(f"cannot read {file}: {e}") from e
        with f:
            start, entries = read_safetensors_header(f, file)
            for key, (stored, shape, begin, end) in entries.items():
                convert = dtype is not None and stored.is_floating_point and not FP32_KEYS.search(key)
                target = dtype if convert else stored
                if key in transient:
                    if scratch.numel() < end - begin:
                        scratch = torch.empty(0, dtype=torch.uint8)
                        scratch = torch.empty(end - begin, dtype=torch.uint8)
                    tensor = scratch[: end - begin].view(stored).view(shape)
                    _read_into(f, start + begin, tensor, file, key)
                elif target == stored and device.type == "cpu":
                    tensor = torch.empty(shape, dtype=stored)
                    _read_into(f, start + begin, tensor, file, key)
                else:
                    if scratch.numel() < end - begin:
                        scratch = torch.empty(0, dtype=torch.uint8)  # free the old one before growing
                        scratch = torch.empty(end - begin, dtype=torch.uint8)
                    source = scratch[: end - begin].view(stored).view(shape)
                    _read_into(f, start + begin, source, file, key)
                    # a dtype change copies on any device; a same-dtype move to another device copies too
                    tensor = source.to(device=device, dtype=target, copy=True)
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


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating-point"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


def check_state_dict(expected: dict[str, torch.Size], found: dict[str, torch.Size], source: str, *,
                     expected_dtypes: dict[str, torch.dtype] | None = None,
                     found_dtypes: dict[str, torch.dtype] | None = None) -> None:
    """Raise a ``CheckpointError`` listing missing, unexpected and mis-shaped keys and, given both dtype maps,
    tensors whose kind of dtype (floating-point / integer / ...) differs from the model's: an integer tensor for a
    float parameter fails deep in ``load_state_dict`` otherwise. (The int8 weights of a quantized checkpoint match
    the int8 buffers of the quantized model, so they pass.)"""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"    {k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
              for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    kinds = []
    if expected_dtypes is not None and found_dtypes is not None:
        for k, want in expected_dtypes.items():
            got = found_dtypes.get(k)
            if got is not None and _kind(got) != _kind(want):
                kinds.append(f"    {k}: checkpoint {str(got).removeprefix('torch.')} ({_kind(got)}) vs model "
                             f"{_kind(want)}")
    if not (missing or unexpected or shapes or kinds):
        return
    parts = [f"checkpoint {source} does not match the model config:"]
    if missing:
        parts.append(f"  {len(missing)} missing key(s):\n{_group(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected key(s):\n{_group(unexpected)}")
    if shapes:
        parts.append(f"  {len(shapes)} shape mismatch(es):\n" + "\n".join(shapes[:20]))
    if kinds:
        parts.append(f"  {len(kinds)} dtype mismatch(es):\n" + "\n".join(kinds[:20]))
    raise CheckpointError("\n".join(parts))


def load_weights(model: torch.nn.Module, directory: Path, *, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu", progress: bool = False,
                 quantize: set[str] | None = None) -> None:
    """Fill a (meta-device) model from a checkpoint directory: strict, assign, one copy. ``quantize``: keys of float
    weights to store as int8 + scale as they are read (:func:`kimivl.quantization.int8.quantize_tensors`)."""
    model_state = model.state_dict()
    expected = {k: v.shape for k, v in model_state.items()}
    tensors = iter_checkpoint_tensors(directory, dtype=dtype, device=device, transient=quantize or frozenset())
    if quantize:
        from kimivl.quantization.int8 import quantize_tensors

        tensors = quantize_tensors(tensors, quantize, device)
    if progress:
        from tqdm.auto import tqdm

        tensors = tqdm(tensors, total=len(expected), desc="loading weights", unit="tensor", leave=False)
    state = dict(tensors)
    check_state_dict(expected, {k: v.shape for k, v in state.items()}, str(directory),
                     expected_dtypes={k: v.dtype for k, v in model_state.items()},
                     found_dtypes={k: v.dtype for k, v in state.items()})
    model.load_state_dict(state, strict=True, assign=True)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        nbytes = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB' / '500MB'")
        unit = (m.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        power = {"B": 0, "KB": 1, "KIB": 1, "MB": 2, "MIB": 2, "GB": 3, "GIB": 3, "TB": 4, "TIB": 4}[unit]
        nbytes = int(float(m.group(1)) * base**power)
    else:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB' / '500MB'")
    if nbytes <= 0:  # huggingface_hub would write one shard per tensor
        raise ValueError(f"max_shard_size {size!r}: must be more than 0 bytes (e.g. '5GB' / '500MB')")
    return nbytes


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy when it is a view into a larger storage (e.g. an expert weight viewed from the
    stacked tensor of :meth:`~kimivl.decoder.moe.DeepseekV3MoE.stacked_experts`): safetensors refuses tensors
    that share memory."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


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
        shard = {k: _own_storage(state_dict[k].detach().contiguous().cpu()) for k in keys}
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
