"""Packaging for LlamaThink. `pip install -e .` for development, `pip install -e ".[gpu]"` for the fla kernels."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "llamathink" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="llamathink",
    version=VERSION,
    description="A small hybrid-attention language model (Gated DeltaNet + compressed sparse attention + full "
    "attention) for Hugging Face transformers, with Muon pretraining, chat finetuning and a C runner",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["llamathink", "llamathink.*", "export_c", "export_c.*"]),
    package_data={
        "llamathink": ["sample_data/*.jsonl", "fla_configs/*.json"],
        "export_c": ["run.c", "Makefile", "*.h"],
    },
    include_package_data=True,
    install_requires=[
        "torch>=2.5",
        # 5.17 (the GPU image) to 5.25 (newest) are tested; 5.24 renamed generate()'s cache argument
        "transformers>=5.17,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "tokenizers>=0.21",
        "sentencepiece>=0.2",
        "protobuf>=4",
        "safetensors>=0.4",
        "huggingface-hub>=0.30",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "wandb>=0.17",
    ],
    extras_require={
        # fla's Gated DeltaNet kernels; on Hopper with Triton < 3.7.1 its backward pass also needs tilelang
        "gpu": ["fla-core==0.6.0", "triton>=3.2"],
        "hopper": ["fla-core==0.6.0", "tilelang==0.1.15"],
        # FlashQLA's fused TileLang delta-rule kernels for Hopper and Blackwell (`gdn_backend: flash_qla`)
        "flash-qla": ["fla-core==0.6.0", "tilelang==0.1.15", "flash-qla==0.1.3"],
        "dev": ["pytest>=8", "matplotlib", "peft>=0.21"],
    },
    entry_points={
        "console_scripts": [
            "llamathink-quickstart=llamathink.quickstart:main",
            "llamathink-prepare=llamathink.data.preparation:main",
            "llamathink-pretrain=llamathink.train.pretrain:main",
            "llamathink-finetune=llamathink.train.finetune:main",
            "llamathink-chat=llamathink.chat:main",
            "llamathink-export-c=export_c.export:main",
        ]
    },
)
