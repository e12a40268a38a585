"""kimivl: a native PyTorch implementation of Kimi-VL (MoonViT + projector + Moonlight MoE)."""
from __future__ import annotations

from setuptools import find_packages, setup

# torch is deliberately unpinned here; pin it on the command line or with
# .ci/constraints.txt (an unpinned torch resolves to a multi-GB CUDA build).
install_requires = [
    "torch>=2.4",
    "safetensors>=0.4",
    "numpy>=1.26",
    "pillow>=10",
    "tiktoken>=0.7",
    "huggingface_hub>=0.30",
    "tqdm",
    "jinja2>=3",
]
extras_require = {
    "video": ["av>=12"],
    "pdf": ["pypdfium2>=4"],
    "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
    "train": ["peft>=0.13", "pyyaml>=6"],
    # structured output (JSON Schema / regex / Lark constrained decoding): generate and kimivl serve's response_format
    "structured": ["llguidance>=1.0"],
    "deepspeed": ["deepspeed>=0.15; platform_system == 'Linux'"],
    "hf": ["transformers>=5,<6"],
    # never installed in CI: needs a CUDA toolchain
    "flash": ["flash-attn>=2.6; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    "test": ["pytest>=8", "fpdf2>=2.7", "openai>=1.40"],
    # browser end-to-end test of the chat page; the browser itself is Debian's chromium (apt), never
    # `playwright install`
    "e2e": ["playwright>=1.45"],
}
extras_require["all"] = sorted({d for k in ("video", "pdf", "serve", "train", "hf", "structured")
                                for d in extras_require[k]})
extras_require["dev"] = sorted({d for k in ("all", "test", "e2e", "deepspeed") for d in extras_require[k]})

setup(
    name="kimivl",
    version="0.1.0",
    description="Native PyTorch Kimi-VL: MoonViT encoder, pixel-shuffle projector, Moonlight MoE decoder",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kimivl", "kimivl.*"]),
    include_package_data=True,
    package_data={"kimivl": ["assets/**/*", "chat/static/*", "ops/csrc/*"]},
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["kimivl=kimivl.cli:main"]},
)
