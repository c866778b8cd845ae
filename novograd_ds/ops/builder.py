"""JIT builders for the fused NovoGrad ops, on ``torch.utils.cpp_extension.load`` and ninja (no DeepSpeed needed).

One builder per op: its sources (absolute paths under ``csrc/``), its flags, a check of what the build needs
(:meth:`OpBuilder.missing`), the build directory, and :meth:`OpBuilder.load`, which builds once and caches the
module per process.

NOTE: [build cache key] The build directory is ``$TORCH_EXTENSIONS_DIR/<key>`` (torch's default root when the
variable is unset), the key made by :func:`cache_dir_name` from everything the binary depends on: the op (for
the CPU op its SIMD level), the Python and torch versions, for the CUDA op the CUDA version and the GPU
architectures it is built for (``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs' compute capabilities;
built for those only), and a hash of the sources, every header under ``csrc/`` and the flags. Nodes of one cluster
that share a home directory but differ in GPUs, torch or sources therefore never load each other's binary, and
a second process on the same node finds the cached module (ninja: nothing to do).

NOTE: [rank-local loading] :meth:`OpBuilder.load` takes an exclusive file lock (``fcntl.lockf`` on
``<build dir>/novograd_ds.lock``) around the build and the import: processes on one node that load the same op
at the same time serialise on it; the first builds, the others wait and then find the module built. Nothing here
touches ``torch.distributed``: a rank that never reaches its first step holds up nobody.

Environment variables:

``TORCH_EXTENSIONS_DIR``            root of the build cache (torch's own variable).
``CXX``                             the C++ compiler (default ``c++``).
``NOVOGRAD_DS_CPU_ISA``             ``avx512``, ``avx2`` or ``scalar``: override the SIMD level detected from torch.
``TORCH_CUDA_ARCH_LIST``            CUDA architectures to build for, e.g. ``8.0;9.0`` (default: the visible GPUs').
``NOVOGRAD_DS_BUILD_VERBOSE``       ``1`` prints the compiler and ninja output.
``NOVOGRAD_DS_BUILD_LOCK_TIMEOUT``  seconds to wait for another process's build (default 1200); then the load
                                    fails with a message naming the lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
LOCK_NAME = "novograd_ds.lock"
_LOCK_TIMEOUT_ENV = "NOVOGRAD_DS_BUILD_LOCK_TIMEOUT"

logger = logging.getLogger("novograd_ds")

# torch.backends.cpu.get_cpu_capability() -> (our ISA name, compiler flags). The flags name exactly the
# instructions the kernel uses, so the build never depends on -march=native guessing the wrong machine.
_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "scalar": [],
}


class OpBuildError(RuntimeError):
    """The op could not be built or loaded; the message says what is missing and how to fix it."""


def _tag(version: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", version).strip("_")


_ARCH = re.compile(r"^(\d+)\.(\d+)([a-z]?)(\+ptx)?$", re.IGNORECASE)


def parse_arch_list(value: str) -> list[str]:
    """``TORCH_CUDA_ARCH_LIST``'s numeric form (``8.0;9.0``, ``8.6 9.0a``, ``9.0+PTX``) as sorted unique entries."""
    archs = set()
    for item in re.split(r"[;, ]+", value.strip()):
        if not item:
            continue
        m = _ARCH.match(item)
        if m is None:
            raise OpBuildError(
                f"TORCH_CUDA_ARCH_LIST={value!r}: {item!r} is not a compute capability; use numbers such as "
                "'8.0;9.0' (append +PTX to also embed PTX, e.g. '9.0+PTX'), or unset it to build for the visible GPUs"
            )
        archs.add(f"{m.group(1)}.{m.group(2)}{m.group(3).lower()}" + ("+PTX" if m.group(4) else ""))
    return sorted(archs)


def _arch_token(arch: str) -> str:
    """``8.0`` -> ``sm80``, ``9.0a`` -> ``sm90a``, ``9.0+PTX`` -> ``sm90ptx``."""
    base, _, ptx = arch.partition("+")
    return "sm" + base.replace(".", "") + ("ptx" if ptx else "")


def gencode_flags(archs: Sequence[str]) -> list[str]:
    """nvcc ``-gencode`` flags that build for exactly ``archs`` (SASS for each; PTX too for ``+PTX`` entries)."""
    flags = []
    for arch in archs:
        base, _, ptx = arch.partition("+")
        num = base.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def cache_dir_name(op: str, *, python: str, torch_version: str, source_hash: str, cuda: Optional[str] = None,
                   archs: Sequence[str] = ()) -> str:
    """The build directory's name: NOTE: [build cache key]. A pure function of its arguments.

    ``op`` names the op (the CPU op's name carries its SIMD level), ``python`` is ``major.minor``,
    ``torch_version`` is ``torch.__version__``, ``source_hash`` a hex digest of sources, headers and flags;
    for the CUDA op ``cuda`` is ``torch.version.cuda`` and ``archs`` the compute capabilities it is built for.
    """
    parts = [op, "py" + python.replace(".", ""), "torch" + _tag(torch_version)]
    if cuda is not None:
        parts.append("cu" + cuda.replace(".", ""))
        parts.append("-".join(_arch_token(a) for a in sorted(set(archs))) or "noarch")
    parts.append(source_hash[:16])
    return "_".join(parts)


def source_digest(files: Sequence[Path], flags: Sequence[Sequence[str]]) -> str:
    """sha256 over the files' names relative to ``csrc/`` (or their names) and contents, then the flags."""
    h = hashlib.sha256()
    for f in sorted(Path(x) for x in files):
        try:
            rel = f.resolve().relative_to(CSRC).as_posix()
        except ValueError:
            rel = f.name
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(json.dumps([list(x) for x in flags]).encode())
    return h.hexdigest()


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


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


_process_lock = threading.Lock()  # lockf locks are per process: threads of one process serialise here


@contextlib.contextmanager
def build_lock(directory: Path, what: str, timeout: Optional[float] = None) -> Iterator[Optional[float]]:
    """Hold the exclusive lock of ``directory`` (NOTE: [rank-local loading]); yields the seconds spent waiting,
    or None where the filesystem has no locks (then nothing is held; a warning says so).

    Raises :class:`OpBuildError` after ``timeout`` seconds (default ``$NOVOGRAD_DS_BUILD_LOCK_TIMEOUT`` or 1200).
    """
    if timeout is None:
        raw = os.environ.get(_LOCK_TIMEOUT_ENV, "1200")
        try:
            timeout = float(raw)
        except ValueError:
            raise OpBuildError(f"{_LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds; unset it or set e.g. 1200") from None
    path = directory / LOCK_NAME
    with _process_lock:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OpBuildError(f"cannot open the build lock {path}: {exc}; set TORCH_EXTENSIONS_DIR to a writable "
                               "directory") from exc
        locked = True
        try:
            start = time.monotonic()
            said = False
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):  # e.g. ENOLCK: no lock support there
                        logger.warning("novograd_ds: cannot lock %s (%s); loading %s without the lock", path, exc, what)
                        locked = False
                        break
                    waited = time.monotonic() - start
                    if waited > timeout:
                        raise OpBuildError(
                            f"waited {waited:.0f} s for the lock on {path}, held by another live process building or "
                            f"loading {what} (the kernel releases the lock of a process that dies): raise "
                            f"{_LOCK_TIMEOUT_ENV}, or find the process with `fuser {path}`"
                        ) from None
                    if not said:
                        logger.info("novograd_ds: another process is building %s in %s; waiting for it", what, directory)
                        said = True
                    time.sleep(0.2)
            try:
                yield time.monotonic() - start if locked else None
            finally:
                if locked:
                    fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class OpBuilder:
    """A JIT-built op: subclasses give :attr:`name`, :meth:`sources` and the flags."""

    name = "abstract"
    _loaded: dict[str, Any] = {}  # per process, by build directory
    last_load: dict[str, dict[str, Any]] = {}  # per build directory: {"built": bool, "waited_s": float}

    def sources(self) -> list[str]:
        raise NotImplementedError

    def cxx_flags(self) -> list[str]:
        # -ffp-contract=off: no fused multiply-add anywhere, so the kernel rounds like the reference backend.
        return ["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-unused-function"]

    def ld_flags(self) -> list[str]:
        return ["-fopenmp"]

    def key_files(self) -> list[Path]:
        """What the binary is built from: the sources and every header under ``csrc/``."""
        return sorted({Path(x) for x in self.sources()} | set(CSRC.rglob("*.h")))

    def cache_key_args(self) -> dict[str, Any]:
        """The arguments of :func:`cache_dir_name` for this op on this machine."""
        flags = (self.cxx_flags(), self.nvcc_flags(), self.ld_flags())
        return dict(op=self.name, python=_python_tag(), torch_version=torch.__version__,
                    source_hash=source_digest(self.key_files(), flags))

    def build_dir(self) -> Path:
        return extensions_root() / cache_dir_name(**self.cache_key_args())

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
        """Build (once, cached on disk) and import the op; raises :class:`OpBuildError` saying what to fix.

        Rank-local: NOTE: [rank-local loading]. Concurrent callers on one node serialise on the build directory's
        file lock; the first builds, the others wait and load what it built.
        """
        d = self.build_dir()
        key = str(d)
        mod = OpBuilder._loaded.get(key)
        if mod is not None:
            return mod
        problems = self.missing()
        if problems:
            raise OpBuildError(f"cannot build {self.name}: " + "; ".join(problems))
        from torch.utils import cpp_extension

        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OpBuildError(f"cannot create the build directory {d}: {exc}; set TORCH_EXTENSIONS_DIR to a "
                               "writable directory") from exc
        with build_lock(d, self.name) as waited:
            mod = OpBuilder._loaded.get(key)  # another thread of this process may have loaded it meanwhile
            if mod is not None:
                return mod
            # torch's own baton (<dir>/lock) is only ever taken under our lock: if it exists now, a process died
            # while building, and torch would wait for it forever.
            if waited is not None:
                with contextlib.suppress(FileNotFoundError):
                    (d / "lock").unlink()
            built_before = self.is_built()
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
            OpBuilder.last_load[key] = dict(built=not built_before, waited_s=waited or 0.0, locked=waited is not None)
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
        return [str(CSRC / "cpu" / "novograd_cpu.cpp"), str(CSRC / "cpu" / "novograd_q8.cpp")]

    def cxx_flags(self) -> list[str]:
        return super().cxx_flags() + _ISA_FLAGS[self.isa]


class CUDAOpBuilder(OpBuilder):
    """The CUDA op: multi-tensor launches over tensors or segments; kernel file free of torch headers."""

    name = "novograd_ds_cuda"
    with_cuda = True

    def __init__(self, archs: Optional[Sequence[str]] = None):
        self.archs = list(archs) if archs is not None else cuda_archs()

    def sources(self) -> list[str]:
        return [str(CSRC / "cuda" / "bindings.cpp"), str(CSRC / "cuda" / "novograd_cuda.cu"),
                str(CSRC / "cuda" / "novograd_q8.cu")]

    def nvcc_flags(self) -> list[str]:
        # --fmad=false: no contraction into FMA, so the update rounds like the reference backend. Explicit
        # -gencode flags: torch then adds none of its own, and the binary holds exactly the key's architectures.
        return ["-O3", "--fmad=false", *gencode_flags(self.archs)]

    def cache_key_args(self) -> dict[str, Any]:
        return dict(super().cache_key_args(), cuda=torch.version.cuda or "none", archs=self.archs)

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
        elif not self.archs:
            problems.append("no CUDA architecture to build for: set TORCH_CUDA_ARCH_LIST, e.g. '9.0'")
        return problems


def cuda_archs() -> list[str]:
    """What the CUDA op is built for: ``TORCH_CUDA_ARCH_LIST`` when set (not ``native``), else the compute
    capabilities of the visible GPUs (none when there is no GPU)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env.lower() != "native":
        return parse_arch_list(env)
    if not torch.cuda.is_available():
        return []
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return sorted(f"{major}.{minor}" for major, minor in caps)


def builder_for(device: torch.device | str) -> OpBuilder:
    """The builder of the op for tensors on ``device`` (``cpu`` or ``cuda``)."""
    dtype = torch.device(device).type
    if dtype == "cpu":
        return CPUOpBuilder()
    if dtype == "cuda":
        return CUDAOpBuilder()
    raise OpBuildError(f"no fused NovoGrad op for device type {dtype!r}; use foreach=True there")
