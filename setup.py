"""dsjax: the DeepSeek family and its training recipe in JAX/Flax."""
import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
# One requirement per line; '#' starts a comment (whole-line or after a requirement).
REQUIREMENTS = [
    requirement
    for requirement in (line.split("#")[0].strip() for line in (HERE / "requirements.txt").read_text().splitlines())
    if requirement
]

setup(
    name="dsjax",
    version="0.1.0",
    description="DeepSeek-LLM, V2, V3 and R1 in JAX/Flax: architectures and the whole training recipe.",
    packages=find_packages(include=["dsjax", "dsjax.*"]),
    python_requires=">=3.10",
    install_requires=REQUIREMENTS,
    extras_require={
        # Parquet inputs of dsjax.data.prepare.
        "data": ["pyarrow>=14"],
        # torch: any recent CPU build (HF parity tests); CI pins the tested versions with .ci/constraints.txt.
        # nbclient + ipykernel run the notebooks in the tests.
        # jax[tpu] brings libtpu, which dsjax.aot (tests/test_aot.py) compiles TPU programs with on any host.
        "test": ["pytest>=8", "pytest-xdist>=3", "torch>=2.4", "transformers>=5.0", "safetensors>=0.4",
                 "pyarrow>=14", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "jax[tpu]==0.10.2"],
    },
)
