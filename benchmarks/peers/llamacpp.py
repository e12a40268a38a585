"""llama.cpp as an optional CPU peer: build it, convert a Kimi-VL checkpoint to GGUF, time it.

Why this peer: llama.cpp is the CPU implementation people actually serve Kimi-VL with, so it is the bar for
our prefill, decode and vision numbers (``shared/reference/performance-notes.md`` §5).

How: llama.cpp is not on the package registries as a binary, but the ``llama-cpp-python`` source package
carries a full llama.cpp in ``vendor/llama.cpp``. ``ensure_built`` downloads that sdist once (pip), extracts
the vendored tree and builds ``llama-bench`` and ``llama-mtmd-cli`` with cmake + ninja for *this* machine
(``GGML_NATIVE=ON``). ``convert_text`` / ``convert_mmproj`` run the vendored ``convert_hf_to_gguf.py`` on an
official-layout checkpoint; ``bench_text`` runs ``llama-bench`` and ``bench_vision`` times the image encode
of ``llama-mtmd-cli``. Everything lands under ``CACHE/llama.cpp`` and is reused.

Reduced-depth benchmark slices trip checks a released model does not; the converter runs through a small
wrapper (``_CONVERT_WRAPPER``) that patches its classes in a child process, never the vendored files:

* the tokenizer: the official Kimi tokenizer is remote code (``tokenization_moonshot.py``) that transformers
  cannot load here, and the converter refuses a pre-tokenizer whose hash it does not know (a reduced vocabulary
  always has a new hash). The wrapper hands the converter's own Kimi-K2 branch kimivl's tokenizer (read from
  ``tiktoken.model`` + ``tokenizer_config.json``: ranks, merges recovered from them, 258 special ids) and
  names the ``kimi-k2`` pre-tokenizer when the hash is unknown. Benchmarks feed random token ids, so token
  texts only need to be consistent with the ids.
* ``q_lora_rank``: llama.cpp's DeepSeek-2 loader treats a missing ``attention.q_lora_rank`` as "a Lite model",
  which it recognises only by 26/27 layers; the wrapper writes ``q_lora_rank = 0`` for models without q_lora.
* the projector: ``multi_modal_projector.linear_1/linear_2`` are renamed through the vision block table, which
  a tower with fewer than 3 layers does not reach; the wrapper uses a longer table.

Numbers depend on the machine: the build is native (``GGML_NATIVE=ON``), so build on the machine that
measures; the cache (``.cache/bench``) is not meant to travel between machines.

CLI::

    python -m benchmarks.peers.llamacpp --build
    python -m benchmarks.peers.llamacpp --checkpoint DIR --text --vision IMAGE [--outtype bf16|q8_0]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import CACHE, REPO
from benchmarks.peers import PeerUnavailable
from benchmarks.slice import derived_name, is_fresh

log = logging.getLogger("benchmarks.peers.llamacpp")

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
VENDORED = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
TARGETS = ("llama-bench", "llama-mtmd-cli")
BUILD_JOBS = 2  # the benchmark host is small and shared; the build is a one-off


def _run(cmd: Sequence[str | os.PathLike[str]], what: str, log_to: Path | None = None,
         **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; a failure becomes ``PeerUnavailable`` naming ``what`` with the tail of its output.
    ``log_to`` keeps the whole output (stdout, then stderr) for a look afterwards."""
    log.info("%s: %s", what, shlex.join(map(str, cmd)))
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace",
                              **kwargs)  # a random model prints arbitrary bytes
    except OSError as e:
        raise PeerUnavailable(f"llama.cpp: {what} could not start ({e})") from e
    if log_to is not None:
        log_to.write_text(f"$ {shlex.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        log.error("%s failed (exit %d):\n%s", what, proc.returncode, "\n".join(tail))
        last = tail[-1] if tail else "no output"
        raise PeerUnavailable(f"llama.cpp: {what} failed (exit {proc.returncode}): {last}")
    return proc


# ------------------------------------------------------------------------------------------------ build
def source_dir(build_dir: Path = CACHE / "llama.cpp") -> Path:
    """The vendored llama.cpp tree (download + extract once)."""
    build_dir = Path(build_dir)
    src = build_dir / "src"
    if (src / "CMakeLists.txt").is_file() and (src / "convert_hf_to_gguf.py").is_file():
        return src
    build_dir.mkdir(parents=True, exist_ok=True)
    sdist = build_dir / SDIST
    if not sdist.is_file():
        # --no-binary: the wheel is a built Python binding; we want the source tree it vendors
        _run([sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps",
              "--no-binary", ":all:", "-d", build_dir], f"downloading the {PACKAGE} {VERSION} sdist")
        if not sdist.is_file():
            raise PeerUnavailable(f"llama.cpp: pip did not leave {SDIST} in {build_dir}")
    log.info("extracting %s from %s", VENDORED, sdist)
    tmp = build_dir / "src.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(VENDORED) and len(m.name) > len(VENDORED)]
        if not members:
            raise PeerUnavailable(f"llama.cpp: {SDIST} holds no {VENDORED}")
        for m in members:
            m.name = m.name[len(VENDORED):]
        tar.extractall(tmp, members=members, filter="data")
    shutil.rmtree(src, ignore_errors=True)
    tmp.rename(src)  # only a complete tree gets the final name
    return src


def ensure_built(build_dir: Path = CACHE / "llama.cpp") -> Path:
    """The directory holding ``llama-bench`` and ``llama-mtmd-cli``, built once (idempotent)."""
    build_dir = Path(build_dir)
    bin_dir = build_dir / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    missing = [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None]
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler")
    if missing:
        raise PeerUnavailable(f"llama.cpp: cannot build, missing {', '.join(missing)}")
    src = source_dir(build_dir)
    t0 = time.perf_counter()
    _run(["cmake", "-S", src, "-B", build_dir / "build", "-G", "Ninja", *CMAKE_FLAGS], "configuring llama.cpp",
         log_to=build_dir / "configure.log")
    # nice: the build must not slow down whatever else shares the host
    _run(["nice", "-n", "19", "ninja", "-C", build_dir / "build", f"-j{BUILD_JOBS}", *TARGETS], "building llama.cpp",
         log_to=build_dir / "build.log")
    if not all((bin_dir / t).is_file() for t in TARGETS):
        raise PeerUnavailable(f"llama.cpp: the build finished but {bin_dir} lacks {' or '.join(TARGETS)}")
    log.info("built %s in %.0f s", ", ".join(TARGETS), time.perf_counter() - t0)
    return bin_dir


# ------------------------------------------------------------------------------------------- conversion
# Written to CACHE/llama.cpp/convert_kimivl.py and run in a child process (argv: the llama.cpp source dir, then
# the converter's own arguments).
# The patches live only in that process; the vendored files stay untouched.
_CONVERT_WRAPPER = r'''
import logging
import sys
from pathlib import Path

src = Path(sys.argv[1])
sys.argv = [str(src / "convert_hf_to_gguf.py"), *sys.argv[2:]]
sys.path[:0] = [str(src), str(src / "gguf-py")]

import gguf
import transformers

import convert_hf_to_gguf
from conversion.deepseek import DeepseekV2Model
from conversion.kimivl import KimiVLModel

log = logging.getLogger("kimivl-convert")
MIN_VISION_BLOCKS = 3  # the projector's linear_1 / linear_2 are looked up as vision blocks 1 and 2

# 1. tokenizer: the official Kimi tokenizer is remote code; the converter's Kimi-K2 branch only needs
#    `.model._mergeable_ranks`, `.special_tokens` and `.encode`, which kimivl's tokenizer provides.
original_set_vocab = DeepseekV2Model.set_vocab
original_vocab_pre = DeepseekV2Model.get_vocab_base_pre


def set_vocab(self):
    if not (self.dir_model / "tiktoken.model").is_file():
        return original_set_vocab(self)
    from kimivl.processing.tokenizer import KimiVLTokenizer

    tokenizer = KimiVLTokenizer.from_pretrained(self.dir_model)
    tokenizer.model = tokenizer._encoding  # where the official tokenizer keeps its tiktoken Encoding

    def no_tokenizer_json():
        raise FileNotFoundError("a tiktoken vocabulary has no tokenizer.json")

    self._set_vocab_gpt2 = no_tokenizer_json
    auto = transformers.AutoTokenizer
    original_from_pretrained = auto.__dict__["from_pretrained"]
    auto.from_pretrained = lambda *args, **kwargs: tokenizer
    try:
        original_set_vocab(self)
    finally:
        auto.from_pretrained = original_from_pretrained


def get_vocab_base_pre(self, tokenizer):
    try:
        return original_vocab_pre(self, tokenizer)
    except NotImplementedError:
        # a benchmark vocabulary has its own hash; its pre-tokenizer regex is the Kimi one
        log.warning("pre-tokenizer hash unknown (a reduced vocabulary): using 'kimi-k2'")
        return "kimi-k2"


# 2. q_lora_rank: the DeepSeek-2 loader reads a missing key as "Lite model" only at 26/27 layers
original_set_params = DeepseekV2Model.set_gguf_parameters


def set_gguf_parameters(self):
    original_set_params(self)
    if self.model_arch == gguf.MODEL_ARCH.DEEPSEEK2 and self.hparams.get("q_lora_rank") is None:
        log.info("no q_lora: writing attention.q_lora_rank = 0")
        self.gguf_writer.add_q_lora_rank(0)


# 3. vision block table long enough for the projector's linear_1 / linear_2
original_vision_init = KimiVLModel.__init__


def vision_init(self, *args, **kwargs):
    original_vision_init(self, *args, **kwargs)
    if self.block_count < MIN_VISION_BLOCKS:
        log.info("vision tower of %d layers: tensor table extended to %d blocks", self.block_count, MIN_VISION_BLOCKS)
        self.tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, MIN_VISION_BLOCKS)


DeepseekV2Model.set_vocab = set_vocab
DeepseekV2Model.get_vocab_base_pre = get_vocab_base_pre
DeepseekV2Model.set_gguf_parameters = set_gguf_parameters
KimiVLModel.__init__ = vision_init
convert_hf_to_gguf.main()
'''

OUTTYPES = ("bf16", "q8_0", "f16", "f32")


def _gguf_dir(build_dir: Path) -> Path:
    return Path(build_dir) / "gguf"


def _convert(checkpoint_dir: Path, out: Path, outtype: str, mmproj: bool, build_dir: Path) -> Path:
    checkpoint_dir = Path(checkpoint_dir).resolve()
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a checkpoint directory (no config.json)")
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    if mmproj and not (checkpoint_dir / "preprocessor_config.json").is_file():
        raise PeerUnavailable(f"llama.cpp: --mmproj needs {checkpoint_dir}/preprocessor_config.json")
    if is_fresh(out, checkpoint_dir):
        return out
    src = source_dir(build_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    wrapper = Path(build_dir) / "convert_kimivl.py"  # a file, so the logged command can be rerun by hand
    if not wrapper.is_file() or wrapper.read_text() != _CONVERT_WRAPPER:
        wrapper.write_text(_CONVERT_WRAPPER)
    cmd: list[str | Path] = ["nice", "-n", "19", sys.executable, wrapper, src, checkpoint_dir,
                             "--outfile", partial, "--outtype", outtype]
    if mmproj:
        cmd.append("--mmproj")
    # kimivl (for the tokenizer) must be importable in the child
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    _run(cmd, f"converting {checkpoint_dir.name} ({'mmproj' if mmproj else 'text'}, {outtype})",
         log_to=out.with_name(out.name + ".log"), env=env)
    partial.rename(out)
    log.info("wrote %s (%.0f MB) in %.0f s", out, out.stat().st_size / 1e6, time.perf_counter() - t0)
    return out


def convert_text(checkpoint_dir: Path, outtype: str = "bf16", build_dir: Path = CACHE / "llama.cpp") -> Path:
    """The language model of ``checkpoint_dir`` as a GGUF (converted once, cached by checkpoint + outtype)."""
    checkpoint_dir = Path(checkpoint_dir)
    return _convert(checkpoint_dir, _gguf_dir(build_dir) / f"{derived_name(checkpoint_dir)}-{outtype}.gguf", outtype,
                    mmproj=False, build_dir=build_dir)


def convert_mmproj(checkpoint_dir: Path, outtype: str = "f16", build_dir: Path = CACHE / "llama.cpp") -> Path:
    """The vision tower + projector of ``checkpoint_dir`` as an mtmd ``mmproj`` GGUF (converted once)."""
    checkpoint_dir = Path(checkpoint_dir)
    return _convert(checkpoint_dir, _gguf_dir(build_dir) / f"mmproj-{derived_name(checkpoint_dir)}-{outtype}.gguf",
                    outtype, mmproj=True, build_dir=build_dir)


# ------------------------------------------------------------------------------------------------ timing
def bench_text(gguf: Path, threads: int = 2, prompt: int = 512, gen: int = 32,
               depths: Sequence[int] = (0, 128, 1024, 4096, 16384), repetitions: int = 3,
               build_dir: Path = CACHE / "llama.cpp") -> dict[str, Any]:
    """Prefill (``prompt`` tokens) and decode (``gen`` tokens) tok/s after each context depth, via ``llama-bench``.

    Returns llama-bench's own means over ``repetitions``: ``prefill_tok_s`` (at the first depth, normally 0),
    ``prefill_tok_s_by_depth`` and ``decode_tok_s`` (``{str(depth): tok/s}``), plus ``by_depth`` with the
    standard deviations (``{str(depth): {"prefill_tok_s": {"mean", "stddev"}, "decode_tok_s": {...}}}``) and
    the ``command`` run.
    """
    bench = ensure_built(build_dir) / "llama-bench"
    cmd = [str(bench), "-m", str(gguf), "-p", str(prompt), "-n", str(gen), "-d", ",".join(map(str, depths)),
           "-t", str(threads), "-r", str(repetitions), "-o", "json"]
    repack_off = None
    try:
        rows = json.loads(_run(cmd, f"llama-bench on {Path(gguf).name}").stdout)
    except PeerUnavailable as e:
        # On AMX hosts ggml's CPU "repack" buffer (AMX/AVX-512 layouts for quantized weights) can leave an op
        # without a backend (GGML_ASSERT(*cur_backend_id != -1), seen with Q8_0 on a Xeon with amx_int8);
        # the plain CPU buffer runs every op, so the run is retried once with `--repack 0` and says so.
        repack_off = str(e)
        cmd += ["--repack", "0"]
        rows = json.loads(_run(cmd, f"llama-bench on {Path(gguf).name} with --repack 0").stdout)
    by_depth: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        # llama-bench emits one row per (test, depth): a prompt test has n_gen 0, a generation test n_prompt 0
        kind = "prefill_tok_s" if row["n_gen"] == 0 else "decode_tok_s"
        by_depth.setdefault(str(row["n_depth"]), {})[kind] = {
            "mean": round(float(row["avg_ts"]), 2), "stddev": round(float(row["stddev_ts"]), 2)}
    means = {kind: {d: v[kind]["mean"] for d, v in by_depth.items() if kind in v}
             for kind in ("prefill_tok_s", "decode_tok_s")}
    first = rows[0] if rows else {}
    # "build": the sdist has no git metadata, so llama-bench's own build number / commit read 0 / unknown
    return {"command": shlex.join(cmd), "build": f"{PACKAGE} {VERSION} vendored",
            "cpu": first.get("cpu_info"), "threads": threads, "prompt": prompt, "gen": gen,
            "repetitions": repetitions, "model_type": first.get("model_type"), "flash_attn": first.get("flash_attn"),
            "kv_type": first.get("type_k"),
            "prefill_tok_s": next(iter(means["prefill_tok_s"].values()), None),
            "prefill_tok_s_by_depth": means["prefill_tok_s"], "decode_tok_s": means["decode_tok_s"],
            "by_depth": by_depth, **({"repack_off_because": repack_off} if repack_off else {})}


KIMIVL_PATCH = 14
PATCHES_PER_TOKEN = 4  # the projector merges 2x2 patches into one token
# llama-mtmd-cli's own lines (with -v): the batch encode time, the size the image was resized to, its tokens
_ENCODED = re.compile(r"mtmd batch encoding done in (\d+) ms")
_RESIZED = re.compile(r"clip_encode: copying image \d+/\d+ to input buffer \(nx=(\d+), ny=(\d+)\)")
_IMAGE_TOKENS = re.compile(r"encoding batch with \d+ entries and total (\d+) tokens")


def _one(pattern: re.Pattern[str], text: str, what: str) -> tuple[str, ...]:
    found = pattern.findall(text)
    if len(found) != 1:
        raise PeerUnavailable(f"llama.cpp: expected one {what} line from llama-mtmd-cli, found {len(found)} "
                              f"(its log format changed?)")
    return found[0] if isinstance(found[0], tuple) else (found[0],)


def bench_vision(mmproj: Path, gguf: Path, image_path: Path, threads: int = 2, repetitions: int = 3,
                 build_dir: Path = CACHE / "llama.cpp") -> dict[str, Any]:
    """Image-encode time of ``llama-mtmd-cli`` (vision tower + projector) for one image, as patches/s.

    Each repetition is one ``llama-mtmd-cli`` run that encodes the image once (so the time includes whatever
    a first encode costs); the time is its ``mtmd batch encoding done in N ms`` line. llama.cpp resizes the
    image itself (sides multiples of 28 px, 8 to 1024 merged tokens): ``resized_hw`` is the size it logged,
    ``patches`` = (H/14) x (W/14) of that size, and ``resize_consistent`` checks it against its token count
    (4 patches per token).
    """
    from PIL import Image

    if repetitions < 1:
        raise ValueError(f"repetitions must be at least 1, got {repetitions}")
    cli = ensure_built(build_dir) / "llama-mtmd-cli"
    image_path = Path(image_path)
    with Image.open(image_path) as im:
        width, height = im.size
    # -v: the resized size and the token count are debug lines
    cmd = [str(cli), "-m", str(gguf), "--mmproj", str(mmproj), "--image", str(image_path), "-p", "Describe the image.",
           "-n", "1", "-t", str(threads), "-c", "4096", "--temp", "0", "-v"]
    encode_ms: list[float] = []
    for _ in range(repetitions):
        proc = _run(cmd, f"llama-mtmd-cli on {image_path.name}",
                    log_to=_gguf_dir(build_dir) / f"mtmd-{Path(mmproj).stem}-{image_path.stem}.log")
        text = proc.stdout + proc.stderr
        encode_ms.append(float(_one(_ENCODED, text, "'mtmd batch encoding done in N ms'")[0]))
        resized_w, resized_h = (int(v) for v in _one(_RESIZED, text, "'copying image ... (nx=W, ny=H)'"))
        tokens = int(_one(_IMAGE_TOKENS, text, "'encoding batch with ... total N tokens'")[0])
    patches = (resized_h // KIMIVL_PATCH) * (resized_w // KIMIVL_PATCH)
    mean_ms = statistics.mean(encode_ms)
    return {"command": shlex.join(cmd), "threads": threads, "image_hw": [height, width],
            "resized_hw": [resized_h, resized_w], "image_tokens": tokens, "patches": patches,
            "resize_consistent": patches == PATCHES_PER_TOKEN * tokens,
            "encode_ms": encode_ms, "encode_ms_mean": round(mean_ms, 1),
            "encode_ms_stddev": round(statistics.stdev(encode_ms), 1) if len(encode_ms) > 1 else 0.0,
            "patches_per_s": round(patches / (mean_ms / 1e3), 1) if mean_ms > 0 else None}


# --------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="store_true", help="only build llama-bench and llama-mtmd-cli")
    parser.add_argument("--build-dir", type=Path, default=CACHE / "llama.cpp")
    parser.add_argument("--checkpoint", type=Path, help="an official-layout Kimi-VL checkpoint directory")
    parser.add_argument("--slice", action="store_true", help="use the benchmark slice (benchmarks.slice.write_slice)")
    parser.add_argument("--text", action="store_true", help="run llama-bench on the language model")
    parser.add_argument("--vision", type=Path, metavar="IMAGE", help="time llama-mtmd-cli's encode of IMAGE")
    parser.add_argument("--outtype", choices=OUTTYPES, default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--depths", default="0,128,1024,4096,16384", help="comma-separated context depths")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    if not args.build and ((args.checkpoint is None and not args.slice) or not (args.text or args.vision)):
        parser.error("give --build, or --checkpoint DIR (or --slice) with --text and/or --vision IMAGE")

    result: dict[str, Any] = {"peer": "llama.cpp", "version": f"{PACKAGE} {VERSION} (vendored)"}
    try:
        result["bin_dir"] = str(ensure_built(args.build_dir))
        if args.build:
            print(json.dumps(result, indent=1))
            return 0
        checkpoint = args.checkpoint
        if args.slice:
            from benchmarks.slice import write_slice
            checkpoint = write_slice()
        gguf = convert_text(checkpoint, args.outtype, args.build_dir)
        result.update(checkpoint=str(checkpoint), gguf=str(gguf))
        if args.text:
            depths = [int(d) for d in args.depths.split(",") if d.strip()]
            result["text"] = bench_text(gguf, args.threads, args.prompt, args.gen, depths, args.repetitions,
                                        args.build_dir)
        if args.vision:
            mmproj = convert_mmproj(checkpoint, build_dir=args.build_dir)
            result["mmproj"] = str(mmproj)
            result["vision"] = bench_vision(mmproj, gguf, args.vision, args.threads, args.repetitions, args.build_dir)
    except PeerUnavailable as e:
        result["skipped"] = str(e)
        print(json.dumps(result, indent=1))
        return 2
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
