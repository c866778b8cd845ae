"""JIT builders for the fused NovoGrad ops, on ``torch.utils.cpp_extension.load`` and ninja (no DeepSpeed needed).

One builder per op: its sources (absolute paths under ``csrc/``), its flags, a check of what the build needs
(:meth:`OpBuilder.missing`), the build directory, and :meth:`OpBuilder.load`, which builds once and caches the
module per process. The build directory is ``$TORCH_EXTENSIONS_DIR/<name>_torch<version>`` (torch's default root
when the variable is unset), so a second process loads the cached module: ninja finds nothing to do.

Environment variables:

``TORCH_EXTENSIONS_DIR``      root of the build cache (torch's own variable).
``CXX``                       the C++ compiler (default ``c++``).
``NOVOGRAD_DS_CPU_ISA``       ``avx512``, ``avx2`` or ``scalar``: override the SIMD level detected from torch.
``TORCH_CUDA_ARCH_LIST``      CUDA architectures to build for (default: the visible GPUs').
``NOVOGRAD_DS_BUILD_VERBOSE`` ``1`` prints the compiler and ninja output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any, Optional

import torch

CSRC = Path(__file__).resolve().parent / "csrc"

# torch.backends.cpu.get_cpu_capability() -> (our ISA name, compiler flags). The flags name exactly the
# instructions the kernel uses, so the build never depends on -march=native guessing the wrong machine.
_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "scalar": [],
}


class OpBuildError(RuntimeError):
    """The op could not be built or loaded; the message says what is missing and how to fix it."""


def _torch_tag() -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)


def extensions_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR``, or torch's default ``~/.cache/torch_extensions/py<XY>_<cpu|cuXXX>``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root).expanduser()
    cu = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    py = f"py{sysconfig.get_python_version().replace('.', '')}"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions" / f"{py}_{cu}"


def cpu_isa() -> str:
    """The SIMD level the CPU op is built for: ``NOVOGRAD_DS_CPU_ISA`` or what torch detected on this CPU."""
    forced = os.environ.get("NOVOGRAD_DS_CPU_ISA", "").strip().lower()
    if forced:
        if forced not in _ISA_FLAGS:
            raise OpBuildError(f"NOVOGRAD_DS_CPU_ISA={forced!r} is not one of {sorted(_ISA_FLAGS)}; unset it to auto-detect")
        return forced
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap.startswith("AVX512"):
        return "avx512"
    if cap.startswith("AVX2"):
        return "avx2"
    return "scalar"


def _verbose() -> bool:
    return os.environ.get("NOVOGRAD_DS_BUILD_VERBOSE", "") not in ("", "0")


class OpBuilder:
    """A JIT-built op: subclasses give :attr:`name`, :meth:`sources` and the flags."""

    name = "abstract"
    _loaded: dict[str, Any] = {}  # per process, by build directory

    def sources(self) -> list[str]:
        raise NotImplementedError

    def cxx_flags(self) -> list[str]:
        # -ffp-contract=off: no fused multiply-add anywhere, so the kernel rounds like the reference backend.
        return ["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-unused-function"]

    def ld_flags(self) -> list[str]:
        return ["-fopenmp"]

    def build_dir(self) -> Path:
        return extensions_root() / f"{self.name}_torch{_torch_tag()}"

    # -- what the build needs ----------------------------------------------------------------------
    def missing(self) -> list[str]:
        """What stops a build here, each with its fix; empty when the op can be built."""
        from torch.utils import cpp_extension

        problems = []
        if not cpp_extension.is_ninja_available():
            problems.append("ninja is not installed: `pip install ninja` (the JIT build runs through it)")
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            where = f"CXX={cxx!r}" if "CXX" in os.environ else "`c++` on PATH"
            problems.append(f"no C++ compiler ({where} not found): install g++ (e.g. `apt-get install g++`) "
                            "or point CXX at one")
        include = sysconfig.get_paths().get("include")
        if not include or not Path(include, "Python.h").exists():
            problems.append(f"Python headers are missing (no Python.h in {include}): install python3-dev")
        return problems

    def is_built(self) -> bool:
        """A compiled module from an earlier build is in :meth:`build_dir` (nothing is built to find out)."""
        d = self.build_dir()
        return d.is_dir() and any(d.glob(f"{self.name}*.so"))

    def load(self) -> Any:
        """Build (once, cached on disk) and import the op; raises :class:`OpBuildError` saying what to fix."""
        key = str(self.build_dir())
        mod = OpBuilder._loaded.get(key)
        if mod is not None:
            return mod
        problems = self.missing()
        if problems:
            raise OpBuildError(f"cannot build {self.name}: " + "; ".join(problems))
        from torch.utils import cpp_extension

        d = self.build_dir()
        d.mkdir(parents=True, exist_ok=True)
        try:
            mod = cpp_extension.load(
                name=self.name,
                sources=self.sources(),
                extra_include_paths=[str(CSRC)],
                extra_cflags=self.cxx_flags(),
                extra_cuda_cflags=self.nvcc_flags(),
                extra_ldflags=self.ld_flags(),
                build_directory=str(d),
                with_cuda=self.with_cuda,
                verbose=_verbose(),
            )
        except (RuntimeError, OSError, subprocess.CalledProcessError, ImportError) as exc:
            raise OpBuildError(
                f"building {self.name} in {d} failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}. "
                "Rerun with NOVOGRAD_DS_BUILD_VERBOSE=1 to see the compiler output"
            ) from exc
        OpBuilder._loaded[key] = mod
        return mod

    with_cuda = False

    def nvcc_flags(self) -> list[str]:
        return []


class CPUOpBuilder(OpBuilder):
    """The C++ op for CPU tensors (CPU training and ZeRO-Offload), OpenMP threads + AVX-512/AVX2 SIMD."""

    def __init__(self, isa: Optional[str] = None):
        self.isa = isa or cpu_isa()
        self.name = f"novograd_ds_cpu_{self.isa}"

    def sources(self) -> list[str]:
        return [str(CSRC / "cpu" / "novograd_cpu.cpp")]

    def cxx_flags(self) -> list[str]:
        return super().cxx_flags() + _ISA_FLAGS[self.isa]


class CUDAOpBuilder(OpBuilder):
    """The CUDA op: multi-tensor launches over tensors or segments; kernel file free of torch headers."""

    name = "novograd_ds_cuda"
    with_cuda = True

    def sources(self) -> list[str]:
        return [str(CSRC / "cuda" / "bindings.cpp"), str(CSRC / "cuda" / "novograd_cuda.cu")]

    def nvcc_flags(self) -> list[str]:
        # --fmad=false: no contraction into FMA, so the update rounds like the reference backend.
        return ["-O3", "--fmad=false"]

    def missing(self) -> list[str]:
        from torch.utils import cpp_extension

        problems = super().missing()
        if torch.version.cuda is None:
            problems.append(f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build of torch")
            return problems
        if cpp_extension.CUDA_HOME is None:
            problems.append("no CUDA toolkit found (nvcc): install the CUDA toolkit matching torch.version.cuda="
                            f"{torch.version.cuda} and set CUDA_HOME")
            return problems
        nvcc = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        try:
            out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
            found = re.search(r"release (\d+)\.(\d+)", out)
        except (OSError, subprocess.SubprocessError):
            found = None
        if found is None:
            problems.append(f"{nvcc} does not run: fix CUDA_HOME ({cpp_extension.CUDA_HOME})")
        elif found.group(1) != torch.version.cuda.split(".")[0]:
            problems.append(f"nvcc is CUDA {found.group(1)}.{found.group(2)} but torch was built with CUDA "
                            f"{torch.version.cuda}: install a matching toolkit and point CUDA_HOME at it")
        if not torch.cuda.is_available():
            problems.append("torch.cuda.is_available() is False: no usable GPU or driver")
        return problems


def builder_for(device: torch.device | str) -> OpBuilder:
    """The builder of the op for tensors on ``device`` (``cpu`` or ``cuda``)."""
    dtype = torch.device(device).type
    if dtype == "cpu":
        return CPUOpBuilder()
    if dtype == "cuda":
        return CUDAOpBuilder()
    raise OpBuildError(f"no fused NovoGrad op for device type {dtype!r}; use foreach=True there")
