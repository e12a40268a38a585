"""open-moonvit (PyPI ``open-moonvit`` 0.2.0) as a peer of the vision benchmark, run in its own venv.

open-moonvit is a single-file PyTorch MoonViT (``shared/reference/performance-notes.md`` §2.4): per-image
patch Conv2d, a bicubic pos-emb resize on every forward, 2-D RoPE via slicing and ``cat``, and on CPU a
Python loop calling SDPA once per image. It installs its own torch, so it lives in a separate venv
(``.cache/bench/venv-moonvit``, torch pinned to the project's 2.13.0 CPU build; an unpinned torch resolves
to a multi-GB CUDA build) and runs in a child process that serves forward passes over a pipe.

Same weights, same maths: the official-layout tensors are renamed to its module names and three
numerical conventions are aligned, so its output equals kimivl's up to rounding (the benchmark checks):

* RoPE channel layout. Kimi-VL rotates interleaved pairs (2j, 2j+1), width on even pairs, height on odd;
  open-moonvit rotates "rotate-half" style, height on channels 0..35 and width on 36..71. Both use
  f_i = 10000^(-4i/Dh) and rotate (re, im) the same way, so they differ by a fixed permutation of each
  head's channels; attention scores are dot products over those channels, so permuting the q and k rows
  of ``wqkv`` (not v) makes its attention equal ours.
* LayerNorm eps 1e-5 (its default is 1e-6); its position table (flat (g*g, D)) is our (64, 64, D) table.
* The projector: its ``MLPProjector`` (2x2 pixel shuffle in the official merge order, fc1, GELU, fc2)
  with ``hidden_act="gelu"`` (erf, as the official projector) and kimivl's ``pre_norm`` LayerNorm applied
  before it as glue (open-moonvit's projector has no pre-norm; per-patch LayerNorm commutes with the
  shuffle).

Parent side: :func:`ensure_venv`, :func:`open_moonvit_state_dict`, :class:`OpenMoonViTServer`. Child side:
``python -I open_moonvit.py serve WORKDIR`` (stdlib, torch and open_moonvit only; no kimivl there).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

VERSION = "0.2.0"
TORCH = "2.13.0"  # the project's CPU wheel; the child must not pull a CUDA build
VISION_PREFIX = "vision_tower."
PROJECTOR_PREFIX = "multi_modal_projector."


# ------------------------------------------------------------------------------------------- key mapping
def rope_channel_permutation(head_dim: int) -> list[int]:
    """For each open-moonvit channel o of a head, the kimivl channel holding the same rotation coordinate.

    open-moonvit: channels [0, Dh/2) height, [Dh/2, Dh) width; inside an axis half, channel m (m < Dh/4) is
    the real part and m + Dh/4 the imaginary part of frequency m. kimivl: pair j = channels (2j, 2j+1)
    (real, imaginary); pair 2m rotates by width * f_m, pair 2m + 1 by height * f_m.
    """
    half, quarter = head_dim // 2, head_dim // 4
    perm = []
    for o in range(head_dim):
        width_axis, r = divmod(o, half)
        imaginary, m = divmod(r, quarter)
        pair = 2 * m + (0 if width_axis else 1)
        perm.append(2 * pair + imaginary)
    return perm


def open_moonvit_state_dict(official: dict[str, torch.Tensor], num_heads: int) -> tuple[dict[str, torch.Tensor],
                                                                                          dict[str, torch.Tensor]]:
    """Official ``vision_tower.*`` / ``multi_modal_projector.*`` tensors -> (open-moonvit ``MoonViT`` state dict,
    ``MLPProjector`` state dict plus ``pre_norm.weight`` / ``pre_norm.bias`` for the glue)."""
    tower: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    names = {"norm0": "layer_norm1", "norm1": "layer_norm2", "wo": "self_attn.proj", "mlp.fc0": "mlp.fc1",
             "mlp.fc1": "mlp.fc2"}
    for key, value in official.items():
        if key.startswith(PROJECTOR_PREFIX):
            name = key[len(PROJECTOR_PREFIX):]
            projector[name.replace("linear_1", "fc1").replace("linear_2", "fc2")] = value
            continue
        if not key.startswith(VISION_PREFIX):
            continue
        name = key[len(VISION_PREFIX):]
        if name == "patch_embed.pos_emb.weight":
            height, width, dim = value.shape
            if height != width:
                raise ValueError(f"open-moonvit needs a square position table, got {height}x{width}")
            tower["pos_embed.pos_embed"] = value.reshape(height * width, dim)
        elif name.startswith("patch_embed.proj."):
            tower[name] = value
        elif name.startswith("encoder.final_layernorm."):
            tower[name.replace("encoder.final_layernorm", "post_layernorm")] = value
        elif name.startswith("encoder.blocks."):
            layer, rest = name[len("encoder.blocks."):].split(".", 1)
            module, param = rest.rsplit(".", 1)
            if module == "wqkv":
                value = _permute_qk_rows(value, num_heads)
                target = "self_attn.qkv"
            else:
                target = names[module]
            tower[f"layers.{layer}.{target}.{param}"] = value
        else:
            raise KeyError(f"no open-moonvit name for {key}")
    return tower, projector


def _permute_qk_rows(value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the q and k output rows of a fused (3D, ...) qkv weight or bias per head; v stays."""
    dim = value.shape[0] // 3
    head_dim = dim // num_heads
    perm = torch.tensor(rope_channel_permutation(head_dim))
    rows = torch.cat([part * dim + h * head_dim + perm for part in range(2) for h in range(num_heads)]
                     + [torch.arange(2 * dim, 3 * dim)])
    return value.index_select(0, rows).contiguous()


# ------------------------------------------------------------------------------------------- parent side
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path | None = None) -> Path:
    """The venv's python, creating the venv once (``python -m venv`` + pinned pip install); raises
    ``PeerUnavailable`` with the reason when that fails."""
    from benchmarks.common import CACHE
    from benchmarks.peers import PeerUnavailable

    venv = Path(venv) if venv else CACHE / "venv-moonvit"
    python = venv_python(venv)
    check = [str(python), "-c", f"import open_moonvit, torch; assert torch.__version__.startswith('{TORCH}')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"[open-moonvit] creating {venv} (torch=={TORCH}, open-moonvit=={VERSION}) ...", file=sys.stderr)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "-q", f"torch=={TORCH}", "numpy", f"open-moonvit=={VERSION}"]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise PeerUnavailable(f"open-moonvit venv: `{' '.join(cmd[:4])} ...` failed: {tail[0]}")
    if subprocess.run(check, capture_output=True).returncode != 0:
        raise PeerUnavailable(f"open-moonvit venv {venv}: open_moonvit / torch {TORCH} not importable after install")
    return python


class OpenMoonViTServer:
    """A child process holding open-moonvit's tower + projector on given weights and images.

    ``run()`` performs one forward (tower, pre-norm glue, projector) and returns its seconds as the child
    measured them; ``run(save=path)`` also writes the (T, D_text) float32 output there. The child's CPU time
    shows in ``pid`` (the benchmark's meter counts it as its own, not as foreign load).
    """

    def __init__(self, python: Path, workdir: Path, official: dict[str, torch.Tensor], config: dict[str, Any],
                 images: list[torch.Tensor], dtype: str, threads: int) -> None:
        from benchmarks.peers import PeerUnavailable

        self._unavailable = PeerUnavailable
        workdir.mkdir(parents=True, exist_ok=True)
        tower, projector = open_moonvit_state_dict(official, config["num_attention_heads"])
        torch.save({"tower": tower, "projector": projector}, workdir / "weights.pt")
        torch.save(images, workdir / "images.pt")
        (workdir / "spec.json").write_text(json.dumps({**config, "dtype": dtype, "threads": threads}))
        # -I: the script's own folder must not shadow the installed ``open_moonvit`` package (same name)
        self.proc = subprocess.Popen([str(python), "-I", str(Path(__file__).resolve()), "serve", str(workdir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.pid = self.proc.pid
        ready = self._reply()
        if ready != "ready":
            raise PeerUnavailable(f"open-moonvit child did not start: {ready}")

    def _reply(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise self._unavailable(f"open-moonvit child exited with status {code} (see its stderr above)")
        return line.strip()

    def run(self, save: Path | None = None) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {save or ''}\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if not reply.startswith("ok "):
            raise self._unavailable(f"open-moonvit forward failed: {reply}")
        return float(reply.split()[1])

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)

    def __enter__(self) -> OpenMoonViTServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -------------------------------------------------------------------------------------------- child side
def _serve(workdir: Path) -> None:
    """Child: build open-moonvit from ``workdir``, then answer ``run [PATH]`` / ``quit`` lines on stdin."""
    import torch.nn.functional as F
    from open_moonvit import MLPProjector, MoonViT, MoonViTConfig

    spec = json.loads((workdir / "spec.json").read_text())
    torch.set_num_threads(int(spec["threads"]))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    weights = torch.load(workdir / "weights.pt", weights_only=True)
    images = [im.to(dtype) for im in torch.load(workdir / "images.pt", weights_only=True)]
    config = MoonViTConfig(hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
                           num_hidden_layers=spec["num_hidden_layers"], num_attention_heads=spec["num_attention_heads"],
                           patch_size=spec["patch_size"], layer_norm_eps=spec["layer_norm_eps"],
                           abs_pos_embed_grid_size=spec["pos_grid"], rope_theta=spec["rope_theta"])
    tower = MoonViT(config)
    tower.load_state_dict(weights["tower"], strict=True)
    pre_norm = {k[len("pre_norm."):]: weights["projector"].pop(k) for k in ("pre_norm.weight", "pre_norm.bias")}
    projector = MLPProjector(spec["hidden_size"], spec["text_hidden_size"], intermediate_size=4 * spec["hidden_size"],
                             hidden_act="gelu")
    projector.load_state_dict(weights["projector"], strict=True)
    tower, projector = tower.to(dtype).eval(), projector.to(dtype).eval()
    norm_weight, norm_bias = pre_norm["weight"].to(dtype), pre_norm["bias"].to(dtype)

    def forward() -> torch.Tensor:
        out = tower(images)
        x = F.layer_norm(out.last_hidden_state, (spec["hidden_size"],), norm_weight, norm_bias, spec["layer_norm_eps"])
        return projector(x, out.grid_shapes, out.cu_seqlens)[0]

    print("ready", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "quit":
            break
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                result = forward()
                seconds = time.perf_counter() - t0
            if arg:
                torch.save(result.float(), arg)
            print(f"ok {seconds:.6f}", flush=True)
        except Exception as e:  # reported to the parent, which skips the peer with this reason
            print(f"error {type(e).__name__}: {e}".replace("\n", " "), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        _serve(Path(sys.argv[2]))
    else:
        sys.exit("usage: python open_moonvit.py serve WORKDIR   (started by benchmarks.bench_vision)")
