from setuptools import setup

VERSION = "0.1.0"

setup(
    name="fmrt",
    version=VERSION,
    description="Flow-matching runtime for NVIDIA GPUs: fused Triton kernels, 3D-RoPE attention, "
    "training and sampling for Wan / FLUX / SD3-style DiTs and MeanFlow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` installs as `fmrt.kernels`; never as a top-level `kernels` (another PyPI project).
    packages=["fmrt", "fmrt.kernels", "fmrt.models", "fmrt.integrations"],
    package_dir={"fmrt": "fmrt", "fmrt.kernels": "kernels"},
    package_data={"fmrt": ["assets/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "einops>=0.7",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "pillow",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist>=3",     # the README's test command runs two workers (-n 2)
            "hypothesis>=6",
            "diffusers>=0.32",
            "matplotlib>=3.7",
            "peft>=0.12",
            # the tiny Wan pipelines of the `fmrt sample --diffusers` tests; < 5.25: 5.25 requires
            # Hugging Face's `kernels`, which this repository's kernels/ shadows from its root
            # (conftest.py imports the installed one first, but torch.multiprocessing's spawned
            # test workers start without it)
            "transformers>=4.45,<5.25",
            "tokenizers",          # (tests/tiny_wan.py builds their tokenizer)
            "ftfy",                # diffusers' Wan image-to-video pipeline cleans prompts with it
            "scipy",               # diffusers' beta sigmas (tests/integrations/*scheduler*)
            # Triton 3.6's interpreter (what the CPU tests run on; torch 2.11 pins triton 3.6)
            # fails on numpy >= 2.4 (`int()` of a 1-element array); 3.8 is fixed. No PEP 508
            # marker can see the installed torch / triton, and only the interpreter is hit (a
            # GPU run of triton 3.6 with numpy 2.5 is fine), so the pin lives in this extra.
            "numpy<2.4",
        ],
        "plot": ["matplotlib>=3.7"],   # fmrt sample --diagnostics
        "video": ["imageio>=2.9", "imageio-ffmpeg"],   # fmrt sample --out *.mp4
        "lora": ["peft>=0.12"],
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["fmrt=fmrt.cli:main"]},
)
