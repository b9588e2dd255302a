"""Install megatiny. `kernels/` is installed as `megatiny.kernels`."""

from setuptools import find_packages, setup

# Pinned: torch must stay the CPU wheel on the CPU machines (a looser pin pulls a CUDA build).
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "numpy==2.4.6",
    "PyYAML==6.0.4",
    "tokenizers==0.23.3",
    "datasketch==2.0.0",
    "safetensors==0.8.0",
    "transformers==5.24.0",
    "tqdm==4.70.1",
    "rich==15.0.0",
    "tensorboard==2.21.0",
    "zstandard==0.25.0",
    "langid==1.1.6",
    "lingua-language-detector==2.1.1",
    "matplotlib==3.11.2",
    "triton==3.9.0",
]

EXTRAS_REQUIRE = {
    "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0", "ruff==0.17.6"],
}

EXT_MODULES = []
CMDCLASS = {}

packages = find_packages(include=["megatiny", "megatiny.*"]) + ["megatiny.kernels"]

setup(
    name="megatiny",
    version="0.1.0",
    description="A small Megatron-style model-parallel LLM training codebase",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"megatiny.kernels": "kernels"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={"console_scripts": ["megatiny = megatiny.cli:main"]},
)
