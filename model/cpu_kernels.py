"""The CPU kernels written in C++ (model/csrc/): built with torch's C++ extension tooling on first use, cached on
disk, loaded from the cache on later starts without a compiler.

- `paged_attention` (csrc/paged_attention.cpp): every query row attends over its block table, read in place;
- `matvec` (csrc/matvec.cpp): y = x W^T for decode's few rows over a weight packed in panels (model/cpu_linear.py),
  float32, bfloat16 or weight-only int8, built for AVX-512 BF16 or else AVX2 + FMA (csrc/matvec_avx2.h);
- `rms_norm` (csrc/rms_norm.cpp): RMSNorm of a bfloat16 row in one pass, in AVX-512 BF16 or AVX2 registers
  (model/cpu_linear.py's `FusedRMSNorm`);
- `decoder_step` (csrc/decoder_step.cpp, the three above linked in): a Llama-shaped stack's whole step in one call
  (model/fused_step.py).

Each kernel's cache key is a hash of its sources (and csrc's headers), the compiler flags, torch's version and this CPU's instruction set
flags (the build targets the CPU it runs on), so a changed kernel or another machine builds anew. Where no
compiler is present (or the build fails), `load(name)` returns None and says why once; the caller then keeps its
plain torch path. `ATTNSERVE_KERNEL_DIR` moves the cache (the Docker image builds into it);
`ATTNSERVE_PAGED_KERNEL=0`, `ATTNSERVE_MATVEC_KERNEL=0`, `ATTNSERVE_NORM_KERNEL=0`, `ATTNSERVE_STEP_KERNEL=0` turn
a kernel off."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("attnserve.kernels")

CSRC = Path(__file__).parent / "csrc"
KERNELS = {  # name: (sources, the environment variable that turns it off, what runs instead)
    "paged_attention": (("paged_attention.cpp",), "ATTNSERVE_PAGED_KERNEL", "attending on the plain torch path"),
    "matvec": (("matvec.cpp",), "ATTNSERVE_MATVEC_KERNEL", "linears on oneDNN / torch"),
    "rms_norm": (("rms_norm.cpp",), "ATTNSERVE_NORM_KERNEL", "RMSNorm on torch's ops"),
    "decoder_step": (("decoder_step.cpp", "matvec.cpp", "paged_attention.cpp", "rms_norm.cpp"),
                     "ATTNSERVE_STEP_KERNEL", "the eager step (a module call per layer part)"),
}
# -fopenmp: at::parallel_for is inline in ATen's headers, its `omp parallel` compiled into the kernel; without the
# flag it runs every work item on the calling thread (it did: two threads took as long as one). -fno-trapping-math:
# no floating-point trap is ever enabled here, and without it GCC 12 would not if-convert the activations' selects
# (csrc/elementwise.h), so their loops stayed scalar (~8 ns a value); the values computed do not change.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math"]
LDFLAGS = ["-fopenmp"]

_loaded: dict[str, ModuleType | None] = {}
_reason: dict[str, str] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNSERVE_KERNEL_DIR") or Path.home() / ".cache" / "attnserve" / "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def sources(name: str) -> list[Path]:
    return [CSRC / file for file in KERNELS[name][0]]


def _flags(name: str) -> list[str]:
    """A kernel linked from several sources keeps only its first source's Python module."""
    return CFLAGS + (["-DATTNSERVE_NO_BINDINGS"] if len(KERNELS[name][0]) > 1 else [])


def build_key(name: str) -> str:
    h = hashlib.sha256()
    for file in sources(name):
        h.update(file.read_bytes())
    for header in sorted(CSRC.glob("*.h")):  # what a source may include
        h.update(header.read_bytes())
    for part in (" ".join(_flags(name) + LDFLAGS), torch.__version__, _cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _import(module_name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(module_name, str(path))
    spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _build(name: str, verbose: bool) -> ModuleType | None:
    _, switch, _ = KERNELS[name]
    module_name = f"attnserve_{name}"
    if os.environ.get(switch, "1") == "0":
        _reason[name] = f"turned off by {switch}=0"
        return None
    directory = cache_dir() / build_key(name)
    built = directory / f"{module_name}.so"
    try:
        if built.exists():
            return _import(module_name, built)
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            _reason[name] = "no C++ compiler found"
            return None
        directory.mkdir(parents=True, exist_ok=True)
        log.info(f"building the {name} kernel (once per machine)", extra={"dir": str(directory)})
        from torch.utils.cpp_extension import load as build

        return build(module_name, [str(f) for f in sources(name)], extra_cflags=_flags(name), extra_ldflags=LDFLAGS,
                     build_directory=str(directory), verbose=verbose)
    except Exception as exc:  # any build or import failure means the plain path
        _reason[name] = f"build failed: {type(exc).__name__}: {str(exc)[:300]}"
        return None


def load(name: str = "paged_attention", verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module `name`, or None (with `why_not(name)` saying why)."""
    if name not in _loaded:
        module = _build(name, verbose)
        if module is None:
            log.warning(f"{name} kernel unavailable: {KERNELS[name][2]}", extra={"reason": _reason.get(name, "")})
        _loaded[name] = module
    return _loaded[name]


def why_not(name: str = "paged_attention") -> str:
    return _reason.get(name, "")


if __name__ == "__main__":  # `python -m model.cpu_kernels`: build (or find) every kernel now
    logging.basicConfig(level=logging.INFO)
    for kernel in KERNELS:
        print(f"{kernel} kernel:", "ready" if load(kernel, verbose=True) is not None else f"unavailable ({why_not(kernel)})")
