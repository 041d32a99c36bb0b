"""attnkit install script.

`pip install -e .` never compiles anything: the native extension in csrc/ is built on first use
(JIT, cached) or ahead of time with `python -m attnkit.native --build` (see docs/design.md).
"""

from setuptools import find_packages, setup

setup(
    name="attnkit",
    version="0.1.0",
    description="Fused Triton and CUDA attention kernels for PyTorch: linear/lightning, "
    "softmax GQA with fused QK-norm, Loki sparse decoding",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Typing :: Typed",
    ],
    packages=find_packages(include=["attnkit", "attnkit.*"]),
    package_data={"attnkit": ["py.typed"]},  # PEP 561: the package ships its type hints
    python_requires=">=3.10",
    # torch is not pinned: any torch >= 2.4 already installed satisfies this, so pip never
    # downloads another one (install the build you want first, e.g. the CPU wheel).
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "einops",
    ],
    extras_require={
        # matplotlib: the benchmark CLI test checks the PNG plots too.
        "test": ["pytest>=7", "numpy", "einops", "matplotlib"],
        "bench": ["matplotlib"],
        "peers": ["flash-linear-attention", "lightning-attn"],
        "transformers": ["transformers>=4.48"],
        "native": ["pybind11", "ninja"],
        "dev": ["ruff"],
    },
)
