"""Vision tower benchmark: MoonViT + projector at the released width on a mixed batch, side by side with peers.

    python -m benchmarks.bench_vision                          # bf16 (default), 4 layers, 2 threads
    python -m benchmarks.bench_vision --dtype fp32 --layers 4 --threads 2 --repeats 3 --out results/vision.json

Every implementation reads the same weights (the synthetic real-width slice of :mod:`benchmarks.slice`:
hidden 1152, 16 heads x 72, MLP 4304, 64x64 position table, ``--layers`` encoder layers, the released
projector 4608 -> 4608 -> 2048; or the official-layout checkpoint given as ``--checkpoint DIR``) and encodes
the same mixed batch of 6 images (``--seed``), 28x28 to 896x896 pixels, preprocessed by kimivl's image
processor (the real patch packing, 6,660 patches). Implementations, timed
alternately in one invocation (:func:`benchmarks.common.compare`), medians of ``--repeats``:

* ``kimivl``: our tower + projector with ``--attn-backend`` (default ``auto``: for bf16 on a CPU with AVX512-BF16
  and no AMX, kimivl's C++ ``avx512_bf16`` attention kernel; elsewhere torch's SDPA per image);
* ``kimivl_sdpa`` (when that backend is not SDPA): the same tower through torch's SDPA per image, so the
  kernel's own gain is the ratio ``vs_kimivl_sdpa``;
* ``dense_mask``: the same modules with the official remote code's ``sdpa_attention`` swapped in: one SDPA
  call over the whole packed sequence with a dense (L, L) block-diagonal boolean mask;
* ``open_moonvit`` (optional): PyPI open-moonvit 0.2.0 in its own venv, in a child process, on the same
  weights (renamed; :mod:`benchmarks.peers.open_moonvit`), its output checked against ours before timing;
* ``llamacpp`` (optional): llama.cpp ``llama-mtmd-cli`` per image on the slice converted to GGUF
  (:mod:`benchmarks.peers.llamacpp`); it resizes images itself and times itself, so it is reported with its
  own patch counts and is not alternated with the others.

Also reported: useful GFLOP/s (linear layers incl. patch embedding and projector, plus attention within
each image), the fraction of the roofline (linear FLOPs at the measured GEMM peak + attention FLOPs at the
faster of the measured SDPA and attention-kernel rates, all in ``--dtype`` on this machine), and peak memory
for batches whose largest image grows (a fresh process per batch, one layer: peak RSS over the forward minus
RSS before it), ours against the dense mask. Shared host: ``worst_foreign_cores`` says how busy other processes kept the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import CACHE, REPO, CpuMeter, compare, dtype_of, emit, machine_info, measure_gemm, ratios
from benchmarks.slice import add_checkpoint_arguments, checkpoint_from_args
from kimivl.ops import cpu_kernels
from kimivl.ops.attention import BACKENDS, resolve_backend, varlen_attention

# (width, height) in pixels: 2x2 up to 64x64 patches; 6,660 patches, 1,665 merged tokens.
MIXED_SIZES: tuple[tuple[int, int], ...] = ((28, 28), (112, 224), (224, 224), (448, 448), (336, 672), (896, 896))
# Memory sweep: two small images plus one square image whose side grows.
MEMORY_BASE: tuple[tuple[int, int], ...] = ((28, 28), (112, 224))
MEMORY_SIDES: tuple[int, ...] = (224, 448, 672, 896)
TARGETS = {"vs_open_moonvit": 1.2, "vs_llamacpp": 2.0, "vs_dense_mask": 4.0}
# ||ours - peer|| / ||ours|| accepted before a peer is timed: rounding differences only. On the slice's random
# weights bf16 rounding alone puts ours (and the dense path) ~0.12 away from fp32 and ~0.05 from each other
# (4 layers + projector); fp32 paths agree to ~1e-6. A wrong channel layout or a leaking mask is O(1).
AGREEMENT = {"fp32": 1e-4, "bf16": 0.25}


# --------------------------------------------------------------------------------------------- loading
def load_vision(directory: Path, dtype: torch.dtype, layers: int | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Our vision tower and projector from an official-layout checkpoint (one strict load each).

    Only the ``vision_tower.*`` / ``multi_modal_projector.*`` tensors are read. ``layers`` keeps the first
    encoder layers only (the memory sweep). Returns (tower, projector, official tensors by key).
    """
    from safetensors import safe_open

    from kimivl.configuration import KimiVLConfig
    from kimivl.projector import KimiVLMultiModalProjector
    from kimivl.vision import MoonVitPretrainedModel

    config = KimiVLConfig.from_json_file(directory / "config.json")
    vision = config.vision_config
    if layers is not None:
        vision.num_hidden_layers = layers
    with torch.device("meta"):
        tower = MoonVitPretrainedModel(vision)
        projector = KimiVLMultiModalProjector(vision, config.text_config)
    index = directory / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
    wanted = {f"vision_tower.{k}" for k in tower.state_dict()} | {f"multi_modal_projector.{k}"
                                                                   for k in projector.state_dict()}
    official: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    official[key] = f.get_tensor(key).to(dtype)
    tower.load_state_dict({k[len("vision_tower."):]: v for k, v in official.items() if k.startswith("vision_tower.")},
                          strict=True, assign=True)
    projector.load_state_dict({k[len("multi_modal_projector."):]: v for k, v in official.items()
                               if k.startswith("multi_modal_projector.")}, strict=True, assign=True)
    return tower.eval(), projector.eval(), official


def synthetic_images(sizes: Sequence[tuple[int, int]], seed: int = 0) -> list[Any]:
    """Deterministic RGB images of the given (width, height): smooth gradients plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for width, height in sizes:
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
        noisy = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(noisy, "RGB"))
    return images


def preprocess(directory: Path, images: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values (L, 3, 14, 14) float32 and image_grid_hws (N, 2) from kimivl's image processor."""
    from kimivl.processing.image_processing import KimiVLImageProcessor

    out = KimiVLImageProcessor.from_pretrained(directory)(images)
    return out["pixel_values"], out["image_grid_hws"]


def unpatchify(pixel_values: torch.Tensor, grid: torch.Tensor, patch: int) -> list[torch.Tensor]:
    """Packed patches back to per-image (3, h*p, w*p) tensors (the processor's padded, normalised images)."""
    images, start = [], 0
    for h, w in grid.tolist():
        block = pixel_values[start:start + h * w].view(h, w, 3, patch, patch)
        images.append(block.permute(2, 0, 3, 1, 4).reshape(3, h * patch, w * patch).contiguous())
        start += h * w
    return images


# ------------------------------------------------------------------------------------------ FLOP model
def vision_flops(grid: torch.Tensor, hidden: int, intermediate: int, layers: int, patch: int, text_hidden: int,
                 merge: int = 4) -> dict[str, float]:
    """Useful FLOPs of tower + projector: linear (patch embed, qkv, wo, MLP, projector) and attention
    (q k^T and p v within each image only)."""
    lengths = [h * w for h, w in grid.tolist()]
    patches = sum(lengths)
    tokens = patches // merge
    embed = 2 * patches * 3 * patch * patch * hidden
    per_layer = 2 * patches * (4 * hidden * hidden + 2 * hidden * intermediate)
    wide = merge * hidden
    projector = 2 * tokens * (wide * wide + wide * text_hidden)
    attention = layers * sum(4 * n * n * hidden for n in lengths)
    return {"linear": float(embed + layers * per_layer + projector), "attention": float(attention)}


def measure_attention(dtype: torch.dtype, n: int, heads: int, head_dim: int, meter: CpuMeter, repeats: int = 3,
                 backend: str = "sdpa") -> float:
    """GFLOP/s of one unmasked attention over an n-patch image (the attention roof): torch's SDPA, or another
    backend of :func:`kimivl.ops.attention.varlen_attention` (``avx512_bf16``: kimivl's C++ kernel)."""
    q, k, v = (torch.randn(1, heads, n, head_dim).to(dtype) for _ in range(3))
    packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # (n, heads, head_dim)
    cu = torch.tensor([0, n], dtype=torch.int32)

    def once() -> None:
        with torch.inference_mode():
            if backend == "sdpa":  # (1, H, n, D) contiguous: a 3-D or strided input can take the math kernel
                F.scaled_dot_product_attention(q, k, v)
            else:
                varlen_attention(*packed, cu, backend=backend, seqlens=[n])

    t0 = time.perf_counter()
    once()
    # Timed regions of >= ~0.3 s: the meter's foreign-load reading is in 10 ms ticks.
    calls = max(1, math.ceil(0.3 / max(time.perf_counter() - t0, 1e-6)))

    def run() -> None:
        for _ in range(calls):
            once()

    seconds = statistics.median(meter.timed(run) for _ in range(repeats)) / calls
    return 4 * n * n * heads * head_dim / seconds / 1e9


# ---------------------------------------------------------------------- the official dense-mask path
def dense_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         *, backend: str = "auto", seqlens: Sequence[int] | None = None) -> torch.Tensor:
    """The official remote code's ``sdpa_attention``: one (1, L, L) boolean block-diagonal mask filled per image,
    one SDPA call over all packed patches. q, k, v: (L, H, Dh) -> (L, H, Dh)."""
    total = q.shape[0]
    bounds = cu_seqlens.tolist()
    mask = torch.zeros(1, total, total, dtype=torch.bool, device=q.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        mask[..., start:end, start:end] = True
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask)
    return out.transpose(0, 1)


@contextlib.contextmanager
def official_dense_attention() -> Iterator[None]:
    """Our tower's attention swapped for the dense-mask path, only inside this block (benchmark-local)."""
    from kimivl.vision import moonvit

    with mock.patch.object(moonvit, "varlen_attention", dense_mask_attention):
        yield


# ---------------------------------------------------------------------------------------------- meter
class ProcessTreeMeter(CpuMeter):
    """``CpuMeter`` that also counts live child processes (the open-moonvit server) as ours, not as foreign."""

    def __init__(self) -> None:
        super().__init__()
        self.children: list[int] = []

    def _sample(self) -> tuple[int, int, float]:
        busy, own, t = CpuMeter._sample()
        for pid in self.children:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            own += int(fields[11]) + int(fields[12])
        return busy, own, t


def log(message: str) -> None:
    """Progress on stderr (stdout carries the JSON)."""
    print(f"[bench_vision] {message}", file=sys.stderr, flush=True)


def agreement(ours: torch.Tensor, other: torch.Tensor) -> float:
    """Relative error of ``other`` against ``ours``: ||ours - other|| / ||ours|| over the whole output."""
    ours, other = ours.double(), other.double()
    return float(torch.linalg.vector_norm(ours - other) / torch.linalg.vector_norm(ours).clamp_min(1e-30))


# ------------------------------------------------------------------------------------------ memory sweep
def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: peak RSS growth over one forward (tower with one layer + projector) of a batch."""
    torch.set_num_threads(int(spec["threads"]))
    directory = Path(spec["dir"])
    tower, projector, _ = load_vision(directory, dtype_of(spec["dtype"]), layers=1)
    del _
    pixel_values, grid = preprocess(directory, synthetic_images([tuple(s) for s in spec["sizes"]]))
    warm_pv, warm_grid = preprocess(directory, synthetic_images([(28, 28)]))
    attention = official_dense_attention() if spec["path"] == "dense_mask" else contextlib.nullcontext()
    with torch.inference_mode(), attention:
        projector(tower(warm_pv, warm_grid))  # thread pools, allocator arenas
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
        before = _status_kib("VmRSS")
        projector(tower(pixel_values, grid))
        peak = _status_kib("VmHWM")
    return {"patches": int(pixel_values.shape[0]), "largest_image_patches": int(grid.prod(-1).max()),
            "peak_delta_mib": round((peak - before) / 1024, 1)}


def memory_sweep(directory: Path, dtype: str, threads: int, paths: Sequence[str]) -> dict[str, Any]:
    rows = []
    for side in MEMORY_SIDES:
        row: dict[str, Any] = {"largest_image_px": [side, side]}
        for path in paths:
            log(f"memory: {path}, largest image {side}x{side}")
            spec = {"dir": str(directory), "dtype": dtype, "threads": threads, "path": path,
                    "sizes": [list(s) for s in (*MEMORY_BASE, (side, side))]}
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_vision", "--memory-probe", json.dumps(spec)],
                                  capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                row[path] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
                continue
            probe = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(patches=probe["patches"], largest_image_patches=probe["largest_image_patches"])
            row[f"{path}_peak_delta_mib"] = probe["peak_delta_mib"]
            row[f"{path}_kib_per_patch"] = round(probe["peak_delta_mib"] * 1024 / probe["patches"], 1)
        rows.append(row)
    return {"layers": 1, "dtype": dtype, "base_images_px": [list(s) for s in MEMORY_BASE], "batches": rows,
            "note": "peak RSS over one forward minus RSS before it, fresh process per batch and path; linear "
                    "growth shows as a constant KiB per patch"}


# ------------------------------------------------------------------------------------------------ peers
def open_moonvit_peer(official: dict[str, torch.Tensor], config: Any, text_hidden: int, pixel_values: torch.Tensor,
                      grid: torch.Tensor, dtype: str, threads: int) -> Any:
    from benchmarks.peers.open_moonvit import OpenMoonViTServer, ensure_venv

    python = ensure_venv()
    spec = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
            "patch_size": config.patch_size, "layer_norm_eps": 1e-5, "pos_grid": config.init_pos_emb_height,
            "rope_theta": 10000.0, "text_hidden_size": text_hidden}
    images = unpatchify(pixel_values, grid, config.patch_size)
    return OpenMoonViTServer(python, CACHE / "open-moonvit-run", {k: v.float() for k, v in official.items()}, spec,
                             images, dtype, threads)


def llamacpp_peer(directory: Path, sizes: Sequence[tuple[int, int]], seed: int, dtype: str, threads: int,
                  repeats: int, meter: CpuMeter) -> dict[str, Any]:
    """llama-mtmd-cli on each image of the mixed batch; patches/s = its patches / its encode time, summed."""
    from benchmarks.peers import llamacpp

    llamacpp.ensure_built()
    mmproj = llamacpp.convert_mmproj(directory, outtype="f16" if dtype == "bf16" else "f32")
    gguf = llamacpp.convert_text(directory, outtype="bf16")  # mtmd needs a text model; it does not time it
    image_dir = CACHE / "vision-images"
    image_dir.mkdir(parents=True, exist_ok=True)
    per_image = []
    for (width, height), image in zip(sizes, synthetic_images(sizes, seed)):
        path = image_dir / (f"mixed-{width}x{height}.png" if seed == 0 else f"mixed-{width}x{height}-seed{seed}.png")
        image.save(path)
        result: dict[str, Any] = {}
        meter.timed(lambda: result.update(llamacpp.bench_vision(mmproj, gguf, path, threads=threads,
                                                                repetitions=repeats)))
        per_image.append(result)
    patches = sum(r["patches"] for r in per_image)
    seconds = sum(r["encode_ms_mean"] for r in per_image) / 1e3
    return {"patches": patches, "seconds": round(seconds, 3), "patches_per_s": round(patches / seconds, 1),
            "mmproj": mmproj.name, "per_image": [{k: r[k] for k in ("image_hw", "resized_hw", "patches",
                                                                      "encode_ms_mean", "resize_consistent")}
                                                 for r in per_image],
            "command": per_image[0]["command"] if per_image else None}


# -------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--layers", type=int, default=None,
                        help="encoder layers of the synthetic slice (4; released: 27)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sizes", nargs="+", metavar="WxH", default=[f"{w}x{h}" for w, h in MIXED_SIZES],
                        help="image sizes of the batch in pixels (default: the mixed batch of 6)")
    parser.add_argument("--attn-backend", default="auto", choices=BACKENDS,
                        help="kimivl's vision attention backend (default auto: the C++ avx512_bf16 kernel for bf16 on "
                             "CPUs with AVX512-BF16 and no AMX, else torch's SDPA per image); when it is not sdpa, "
                             "the same tower through SDPA is timed too (row kimivl_sdpa)")
    parser.add_argument("--no-open-moonvit", action="store_true")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense-mask path (slow)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory sweep")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    add_checkpoint_arguments(parser)
    args = parser.parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return 0

    torch.set_num_threads(args.threads)
    dtype = dtype_of(args.dtype)
    meter = ProcessTreeMeter()
    directory, _ = checkpoint_from_args(parser, args, {"vision_layers": "--layers"}, vision_layers=args.layers)
    tower, projector, official = load_vision(directory, dtype)
    config = tower.config
    text_hidden = projector.linear_2.out_features
    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes]
    pixel_values, grid = preprocess(directory, synthetic_images(sizes, args.seed))
    patches = int(pixel_values.shape[0])
    flops = vision_flops(grid, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                         config.patch_size, text_hidden)
    result: dict[str, Any] = {
        "benchmark": "vision", "machine": machine_info(args.threads), "dtype": args.dtype,
        "layers": config.num_hidden_layers, "checkpoint": str(directory), "seed": args.seed,
        "batch": {"images_px_wh": [list(s) for s in sizes], "grids_hw": grid.tolist(), "patches": patches,
                  "merged_tokens": patches // 4},
        "useful_gflop": {"linear": round(flops["linear"] / 1e9, 1), "attention": round(flops["attention"] / 1e9, 1)},
    }

    def run(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.inference_mode():
                return fn()
        return call

    if dtype == torch.bfloat16:
        cpu_kernels.kernels()  # built before any timing (a first bf16 forward would build it: ~1-2 min, once)
    probe = torch.empty(1, config.num_attention_heads, config.head_dim, dtype=dtype)
    with torch.inference_mode():
        backend = resolve_backend(args.attn_backend, probe)
    tower.attn_backend = backend
    result["attention_backend"] = backend

    def through_sdpa() -> torch.Tensor:
        tower.attn_backend = "sdpa"
        try:
            return projector(tower(pixel_values, grid))
        finally:
            tower.attn_backend = backend

    runs: dict[str, Callable[[], Any]] = {"kimivl": run(lambda: projector(tower(pixel_values, grid)))}
    log(f"{patches} patches, {config.num_hidden_layers} layers, {args.dtype}, attention {backend}: "
        "warm-up and output checks")
    reference = runs["kimivl"]()  # also the warm-up
    checks: dict[str, Any] = {}
    if backend != "sdpa":  # the same tower on torch's attention: what the backend itself gains
        runs["kimivl_sdpa"] = run(through_sdpa)
        checks["kimivl_sdpa"] = agreement(reference, runs["kimivl_sdpa"]())
    if not args.no_dense:
        def dense() -> torch.Tensor:
            with official_dense_attention():
                return projector(tower(pixel_values, grid))
        runs["dense_mask"] = run(dense)
        checks["dense_mask"] = agreement(reference, runs["dense_mask"]())

    server = None
    peers: dict[str, Any] = {}
    if not args.no_open_moonvit:
        try:
            server = open_moonvit_peer(official, config, text_hidden, pixel_values, grid, args.dtype, args.threads)
            meter.children.append(server.pid)
            with tempfile.TemporaryDirectory() as tmp:
                server.run(save=Path(tmp) / "out.pt")  # warm-up and the output check
                checks["open_moonvit"] = agreement(reference, torch.load(Path(tmp) / "out.pt", weights_only=True))
            if checks["open_moonvit"] > AGREEMENT[args.dtype]:
                peers["open_moonvit"] = {"skipped": f"output differs from ours: relative error "
                                                    f"{checks['open_moonvit']:.2e} > {AGREEMENT[args.dtype]}"}
            else:
                runs["open_moonvit"] = server.run
        except Exception as e:  # optional peer: reported with the reason, never fatal
            peers["open_moonvit"] = {"skipped": f"{type(e).__name__}: {e}"}
    result["rel_error_vs_kimivl"] = {k: float(f"{v:.3g}") for k, v in checks.items()}
    for name in ("dense_mask", "kimivl_sdpa"):
        if name in checks and checks[name] > AGREEMENT[args.dtype]:
            raise SystemExit(f"{name} output differs from ours ({checks[name]:.2e}): not timing a wrong result")

    log(f"timing {', '.join(runs)} alternately, {args.repeats} repeats")
    try:
        seconds = compare(meter, runs, args.repeats, warmup=0)
    finally:
        if server is not None:
            server.close()
    rates = {name: patches / s for name, s in seconds.items()}

    if not args.no_llamacpp:
        log("llama.cpp")
        try:
            peers["llamacpp"] = llamacpp_peer(directory, sizes, args.seed, args.dtype, args.threads, args.repeats,
                                              meter)
            rates["llamacpp"] = peers["llamacpp"]["patches_per_s"]
        except Exception as e:  # optional peer (not built, conversion failed, ...): reported, never fatal
            peers["llamacpp"] = {"skipped": f"{type(e).__name__}: {e}"}

    log("machine limits: GEMM and SDPA rates")
    largest = int(grid.prod(-1).max())
    gemm = measure_gemm(dtype, meter=meter)
    sdpa = measure_attention(dtype, min(largest, 4096), config.num_attention_heads, config.head_dim, meter)
    kernel = (measure_attention(dtype, min(largest, 4096), config.num_attention_heads, config.head_dim, meter,
                           backend=backend) if backend not in ("sdpa", "eager") else None)
    attention_rate = max(sdpa, kernel or 0.0)  # the faster attention this machine has
    bound = flops["linear"] / (gemm * 1e9) + flops["attention"] / (attention_rate * 1e9)
    total = flops["linear"] + flops["attention"]
    result.update({
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "patches_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ratios": ratios(rates),
        "targets": TARGETS,
        "useful_gflop_per_s": {k: round(total / s / 1e9, 1) for k, s in seconds.items()},
        "roofline": {"gemm_gflop_s": round(gemm, 1), "sdpa_gflop_s": round(sdpa, 1),
                     **({f"{backend}_gflop_s": round(kernel, 1)} if kernel else {}),
                     "sdpa_at_patches": min(largest, 4096), "bound_s": round(bound, 3),
                     "fraction": {k: round(bound / s, 3) for k, s in seconds.items()}},
        "peers": peers,
    })
    if not args.no_memory:
        paths = ["kimivl"] + ([] if args.no_dense else ["dense_mask"])
        result["memory"] = memory_sweep(directory, args.dtype, args.threads, paths)
    result.update(meter.report())
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
