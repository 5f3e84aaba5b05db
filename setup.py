"""an_megatron: train anGPT (the approximately normalized Transformer) with DeepSpeed and megatron-core."""

from setuptools import find_packages, setup

setup(
    name="an_megatron",
    version="0.1.0",
    description="Train anGPT, nGPT and GPT+ at scale on DeepSpeed and megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["an_megatron", "an_megatron.*", "megatron_patches", "megatron_patches.*"]),
    install_requires=[
        # torch is not pinned: install the build that fits your machine first
        # (CPU: `pip install torch==2.13.0`; GPU: the CUDA build of your cluster).
        "torch>=2.4",
        # Pinned: megatron-core's tensor_parallel/datasets API and DeepSpeed's optimizer
        # internals (fp32 partitions, _hp_mapping) move between releases.
        "megatron-core==0.16.1",
        "deepspeed==0.19.8",
        "numpy",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "tqdm",
        # The Hugging Face export (tools/export_hf.py) and the exported model's code; pinned:
        # the modeling code follows transformers' cache and generation interfaces, which move
        # between releases. protobuf: reading a SentencePiece model to build its tokenizer.json.
        "transformers==5.24.0",
        "safetensors==0.8.0",
        "protobuf>=4",
    ],
    extras_require={
        # ruff pinned: its formatter's output changes between releases, and CI checks it
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "matplotlib",
            "psutil",
            "ruff==0.17.6",
            # evaluation of exported models (tests/test_lm_eval.py); [hf] brings accelerate
            "lm_eval[hf]==0.4.13",
        ],
        # Transformer Engine needs CUDA and a matching toolkit; it is imported lazily and
        # only when FP8 is asked for.
        "fp8": ["transformer-engine[pytorch]"],
    },
)
