"""Shared fixtures: the golden tiny checkpoint produced by the official implementation; small media files
(mp4, PDF) built on the fly."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO.parent / "shared" / "golden" / "kimivl-tiny"
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN_DIR / "config.json").is_file():
        pytest.skip(f"golden set not found at {GOLDEN_DIR} (../shared beside the repo)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden(golden_dir: Path) -> dict[str, torch.Tensor]:
    """All expected tensors of the official implementation (expected/expected.safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "expected" / "expected.safetensors"))


@pytest.fixture(scope="session")
def golden_weights(golden_dir: Path) -> dict[str, torch.Tensor]:
    """The official-layout tiny state dict (model.safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "model.safetensors"))


@pytest.fixture(scope="session")
def configs_dir() -> Path:
    return CONFIGS


@pytest.fixture(scope="session")
def cpu_ext():
    """kimivl's compiled CPU kernels (kimivl.ops.cpu_kernels), or a skip saying why they are missing."""
    from kimivl.ops import cpu_kernels

    ext = cpu_kernels.kernels()
    if ext is None:
        pytest.skip("kimivl CPU kernels could not be built here (no g++/ninja?) or KIMIVL_CPU_KERNELS=0")
    return ext


@pytest.fixture(scope="session")
def make_video() -> Callable[..., Path]:
    """Write an H.264 mp4 whose frame ``i`` is filled with the flat colour ``(9i % 256, 255 - 9i % 256, 128)``
    (test_media.frame_colour; flat colours survive lossy H.264 within a few levels)."""
    av = pytest.importorskip("av", reason="video tests need PyAV (pip install 'kimivl[video]')")

    def make(path: Path, *, frames: int = 25, fps: int = 10, width: int = 64, height: int = 48,
             gop: int | None = None) -> Path:
        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps, options={"g": str(gop)} if gop else None)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(frames):
                arr = np.empty((height, width, 3), np.uint8)
                arr[...] = ((i * 9) % 256, 255 - (i * 9) % 256, 128)
                for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path

    return make


@pytest.fixture(scope="session")
def make_pdf() -> Callable[..., bytes]:
    """PDF bytes with one page per (width_pt, height_pt); page i shows 'Page i' and a filled square."""
    pytest.importorskip("pypdfium2", reason="PDF tests need pypdfium2 (pip install 'kimivl[pdf]')")
    fpdf = pytest.importorskip("fpdf", reason="PDF fixtures need fpdf2 (pip install 'kimivl[test]')")

    def make(sizes: list[tuple[float, float]], *, password: str | None = None) -> bytes:
        pdf = fpdf.FPDF(unit="pt")
        for i, (w, h) in enumerate(sizes, 1):
            pdf.add_page(format=(w, h))
            pdf.set_font("helvetica", size=14)
            pdf.text(10, 30, f"Page {i}")
            pdf.set_fill_color(200, 30, 30)
            pdf.rect(10, 40, 20, 20, style="F")
        if password:
            pdf.set_encryption(owner_password="owner", user_password=password)
        return bytes(pdf.output())

    return make
