"""Build script: pure-Python package, plus two optional native modules, each a torch-free pybind11 module built by CMake:

* ``lora_kernels._cpu`` (csrc/cpu/): the torch backend's fused CPU dropout pass, built whenever a C++ compiler is
  found (seconds). A failed or skipped build prints one line; at run time the torch backend then hashes the mask
  with torch ops and logs why (``lora_kernels.backends.torch.native.status()``).
* ``lora_kernels._C`` (CMakeLists.txt): the CUDA kernels, built when nvcc is found (nvcc, Ninja, a static cudart).

The native builds never break install: no nvcc, or LORA_KERNELS_SKIP_CUDA=1, prints one line and installs without
``_C`` (so `pip install -e .` stays fast). Environment:

    LORA_KERNELS_SKIP_CPU=1            skip lora_kernels._cpu
    LORA_KERNELS_SKIP_CUDA=1           skip lora_kernels._C
    LORA_KERNELS_CUDA_ARCHS="80;90"    CMAKE_CUDA_ARCHITECTURES (default "80;90"; e.g. "90" on an H100/H200 only)
    LORA_KERNELS_SKIP_CUBLAS=1         build _C only, not _C_cublas (plan "cublas": needs cuBLASLt headers + library)
    LORA_KERNELS_CUBLAS_ROOT=DIR       where include/cublasLt.h and lib/libcublasLt.so.* are (default: the installed
                                       `nvidia-cublas` wheel, nvidia/cu13 or nvidia/cublas, then the CUDA toolkit)
    LORA_KERNELS_BUILD_JOBS=N          parallel compile jobs (default: CPU count)
    CUDACXX / CUDA_HOME                which nvcc to use
    CXX                                which C++ compiler builds lora_kernels._cpu (default: c++, g++, clang++)

One command builds it in place (what CI and the GPU check run; see csrc/README.md)::

    python setup.py build_ext --inplace          # or: pip install -e . --no-build-isolation
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    candidates.append(shutil.which("nvcc"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _find_cxx() -> str | None:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        found = shutil.which(c) if c else None
        if found:
            return found
    return None


def _cmake_and_generator() -> tuple[str, list[str]]:
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as cmake_mod  # pip's cmake wheel

            cmake = os.path.join(cmake_mod.CMAKE_BIN_DIR, "cmake")
        except ImportError as exc:
            raise RuntimeError("building lora_kernels._C needs CMake >= 3.18 (pip install cmake)") from exc
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as ninja_mod

            ninja = os.path.join(ninja_mod.BIN_DIR, "ninja")
        except ImportError:
            ninja = None
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    return cmake, gen


def _cublas_root() -> str | None:
    """The directory holding include/cublasLt.h and lib/libcublasLt.so.<major>: LORA_KERNELS_CUBLAS_ROOT, the
    `nvidia-cublas` wheel of this Python (a build requirement: pyproject.toml), or the CUDA toolkit."""
    roots = [os.environ.get("LORA_KERNELS_CUBLAS_ROOT")]
    try:
        import nvidia  # namespace package of NVIDIA's PyPI wheels

        for base in nvidia.__path__:
            roots += [os.path.join(base, "cu13"), os.path.join(base, "cublas")]
    except ImportError:
        pass
    nvcc = _find_nvcc()
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in roots:
        if not root or not os.path.isfile(os.path.join(root, "include", "cublasLt.h")):
            continue
        for lib in ("lib", "lib64"):
            d = os.path.join(root, lib)
            if os.path.isdir(d) and any(f.startswith("libcublasLt.so") for f in os.listdir(d)):
                return root
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Two CMake builds: csrc/cpu makes lora_kernels._cpu; the top-level CMakeLists.txt makes every CUDA module
    (lora_kernels._C and, with cuBLASLt, lora_kernels._C_cublas) in one go. Each module is declared as an extension
    so that setuptools copies it (``--inplace``) or packages it (wheels)."""

    _cuda_built = False

    def build_extension(self, ext: Extension) -> None:
        cpu = ext.name == "lora_kernels._cpu"
        if not cpu:
            if CMakeBuild._cuda_built:
                return
            CMakeBuild._cuda_built = True
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ("cmake-cpu" if cpu else "cmake")
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake, gen = _cmake_and_generator()
        cfg = [
            cmake,
            "-S",
            str(ROOT / "csrc" / "cpu" if cpu else ROOT),
            "-B",
            str(build_dir),
            *gen,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLORA_KERNELS_OUTPUT_DIR={out_dir}",
        ]
        if cpu:
            cfg.append(f"-DCMAKE_CXX_COMPILER={_find_cxx()}")
        else:
            archs = os.environ.get("LORA_KERNELS_CUDA_ARCHS", "80;90")
            cfg += [f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
            if _CUBLAS_ROOT is None:
                cfg.append("-DLORA_KERNELS_WITH_CUBLAS=OFF")
            else:
                cfg.append(f"-DLORA_KERNELS_CUBLAS_ROOT={_CUBLAS_ROOT}")
        jobs = os.environ.get("LORA_KERNELS_BUILD_JOBS", str(os.cpu_count() or 1))
        try:
            subprocess.run(cfg, check=True)
            subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        except (subprocess.CalledProcessError, OSError) as e:
            if not cpu:
                raise
            # the CPU pass is an optimisation with a torch fallback: a failed build must not fail the install
            print(f"lora_kernels: building lora_kernels._cpu failed ({e}); the torch backend's CPU dropout will run "
                  "on torch ops and say so at run time")  # fmt: skip


def _ext_modules() -> list[Extension]:
    exts = []
    if os.environ.get("LORA_KERNELS_SKIP_CPU") == "1":
        print("lora_kernels: LORA_KERNELS_SKIP_CPU=1, installing without lora_kernels._cpu (CPU dropout on torch ops)")
    elif _find_cxx() is None:
        print("lora_kernels: no C++ compiler found, installing without lora_kernels._cpu (CPU dropout on torch ops)")
    else:
        exts.append(CMakeExtension("lora_kernels._cpu"))
    if os.environ.get("LORA_KERNELS_SKIP_CUDA") == "1":
        print("lora_kernels: LORA_KERNELS_SKIP_CUDA=1, installing without lora_kernels._C")
        return exts
    if _find_nvcc() is None:
        print("lora_kernels: nvcc not found, installing without lora_kernels._C")
        return exts
    exts.append(CMakeExtension("lora_kernels._C"))
    if _CUBLAS_ROOT is not None:
        exts.append(CMakeExtension("lora_kernels._C_cublas"))
    elif os.environ.get("LORA_KERNELS_SKIP_CUBLAS") == "1":
        print("lora_kernels: LORA_KERNELS_SKIP_CUBLAS=1: building lora_kernels._C only (no plan 'cublas')")
    else:
        print(
            "lora_kernels: cuBLASLt headers/library not found (pip install nvidia-cublas, or set "
            "LORA_KERNELS_CUBLAS_ROOT): building lora_kernels._C only (no plan 'cublas')"
        )
    return exts


_CUBLAS_ROOT = None if os.environ.get("LORA_KERNELS_SKIP_CUBLAS") == "1" else _cublas_root()
_exts = _ext_modules()
setup(ext_modules=_exts, cmdclass={"build_ext": CMakeBuild} if _exts else {})
