import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("sparse_pretrain/__init__.py").read_text()).group(1)

setup(
    name="prune-ofa",
    version=version,
    description="Sparse pre-trained language models, the Prune Once for All way, on DeepSpeed and Accelerate",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["launcher", "launcher.*", "sparse_pretrain", "sparse_pretrain.*",
                                    "finetune", "finetune.*"]),
    # Loose lower bounds here; the exact, tested pins are in constraints.txt (torch first).
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46",
        "datasets>=3.0",
        "deepspeed>=0.16",
        "accelerate>=1.0",
        "numpy>=1.26",
        "tensorboard>=2.15",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pydantic>=2.5",      # the recipe schema (DeepSpeed needs it too)
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5", "psutil>=5.9",   # psutil: kill a run's process tree
                             "ruff>=0.17"],                                       # the linter: `make lint`
                    # reads the Austen novels' R data file when materializing the offline corpus
                    "corpus": ["rdata>=1.0"]},
    entry_points={"console_scripts": ["prune-ofa=launcher.cli:main"]},
)
