"""dsjax: the DeepSeek family and its training recipe in JAX/Flax."""
import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
REQUIREMENTS = [
    line.strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="dsjax",
    version="0.1.0",
    description="DeepSeek-LLM, V2, V3 and R1 in JAX/Flax: architectures and the whole training recipe.",
    packages=find_packages(include=["dsjax", "dsjax.*"]),
    python_requires=">=3.10",
    install_requires=REQUIREMENTS,
    extras_require={
        # torch 2.13.0 (CPU build) is on the development machines' disk; another version downloads gigabytes.
        # nbclient + ipykernel run the notebooks in the tests.
        # jax[tpu] brings libtpu, which dsjax.aot (tests/test_aot.py) compiles TPU programs with on any host.
        "test": ["pytest>=8", "pytest-xdist>=3", "torch==2.13.0", "transformers>=5.0", "nbclient>=0.10",
                 "nbformat>=5.10", "ipykernel>=6.29", "jax[tpu]==0.10.2"],
    },
)
