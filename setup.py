"""Install megatiny."""

import os
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

# Pinned: torch must stay the CPU wheel on the CPU machines (a looser pin pulls a CUDA build).
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "numpy==2.4.6",
    "PyYAML==6.0.4",
    "tokenizers==0.23.3",
    "datasketch==2.0.0",
    "safetensors==0.8.0",
    "transformers==5.24.0",
    "jinja2==3.1.6",  # chat templates (transformers' renderer)
    "gguf==0.19.0",  # `convert --from-hf --gguf-file` (transformers' GGUF loader) ...
    "accelerate==1.15.0",  # ... which also needs accelerate
    "tqdm==4.70.1",
    "rich==15.0.0",
    "tensorboard==2.21.0",
    "zstandard==0.25.0",
    "langid==1.1.6",
    "lingua-language-detector==2.1.1",
    "cld3-py==3.1.0",
    "matplotlib==3.11.2",
    "triton==3.9.0",
]

EXTRAS_REQUIRE = {
    "wandb": ["wandb==0.31.0"],  # train.wandb=true (optional)
    "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0", "ruff==0.17.6", "wandb==0.31.0"],
}


class NinjaBuildExt(build_ext):
    """Compile C++ extensions with ninja (incremental, parallel) instead of distutils' compiler.

    pybind11 and ninja come from pyproject.toml's build requirements; nothing compiles at import.
    """

    CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra"]
    # -ffp-contract=off: no fused multiply-add, so the blending arithmetic is bit-identical to the
    # numpy reference (and to Megatron's build) on every CPU.
    CXXFLAGS += ["-ffp-contract=off", "-DNDEBUG"]

    def build_extension(self, ext):
        import ninja
        import pybind11

        out = os.path.abspath(self.get_ext_fullpath(ext.name))
        tmp = os.path.abspath(os.path.join(self.build_temp, ext.name))
        os.makedirs(tmp, exist_ok=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        paths = sysconfig.get_paths()
        includes = {pybind11.get_include(), paths["include"], paths["platinclude"]}
        cxx = os.environ.get("CXX", "c++")
        ldflags = ["-shared"] + (
            ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
        )
        lines = [
            f"cxx = {cxx}",
            "cflags = " + " ".join(self.CXXFLAGS + [f"-I{i}" for i in sorted(includes)]),
            "ldflags = " + " ".join(ldflags),
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "rule link",
            "  command = $cxx $in $ldflags -o $out",
        ]
        objects = []
        for src in ext.sources:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            lines.append(f"build {obj}: cxx {os.path.abspath(src)}")
            objects.append(obj)
        lines.append(f"build {out}: link {' '.join(objects)}")
        with open(os.path.join(tmp, "build.ninja"), "w") as f:
            f.write("\n".join(lines) + "\n")
        subprocess.check_call([os.path.join(ninja.BIN_DIR, "ninja"), "-C", tmp])


EXT_MODULES = [Extension("megatiny._C", sources=["csrc/helpers.cpp"], language="c++")]
CMDCLASS = {"build_ext": NinjaBuildExt}


setup(
    name="megatiny",
    version="0.1.0",
    description="A small Megatron-style model-parallel LLM training codebase",
    python_requires=">=3.10",
    packages=find_packages(include=["megatiny", "megatiny.*"]),
    package_data={"megatiny.plan": ["profiles/*.yaml", "profiles/chips/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={"console_scripts": ["megatiny = megatiny.cli:main"]},
)
