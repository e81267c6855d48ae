"""The CPU paged-attention kernel (model/csrc/paged_attention.cpp): built with torch's C++ extension tooling on
first use, cached on disk, loaded from the cache on later starts without a compiler.

The cache key is a hash of the source, the compiler flags, torch's version and this CPU's instruction set
flags (the build targets the CPU it runs on), so a changed kernel or another machine builds anew. Where no
compiler is present (or the build fails), `load()` returns None and says why once; the caller then attends on
its plain torch path. `ATTNSERVE_KERNEL_DIR` moves the cache (the Docker image builds into it);
`ATTNSERVE_PAGED_KERNEL=0` turns the kernel off."""

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

NAME = "attnserve_paged_attention"
SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
# -fopenmp: at::parallel_for is inline in ATen's headers, its `omp parallel` compiled into this kernel; without the
# flag it runs every work item on the calling thread (it did: two threads took as long as one)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
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


def build_key() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (" ".join(CFLAGS + LDFLAGS), torch.__version__, _cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
    spec = importlib.util.spec_from_file_location(NAME, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module, or None (with `why_not()` saying why)."""
    if "module" in _loaded:
        return _loaded["module"]
    module: ModuleType | None = None
    if os.environ.get("ATTNSERVE_PAGED_KERNEL", "1") == "0":
        _reason["why"] = "turned off by ATTNSERVE_PAGED_KERNEL=0"
    else:
        directory = cache_dir() / build_key()
        built = directory / f"{NAME}.so"
        try:
            if built.exists():
                module = _import(built)
            elif shutil.which(os.environ.get("CXX", "c++")) is None:
                _reason["why"] = "no C++ compiler found"
            else:
                directory.mkdir(parents=True, exist_ok=True)
                log.info("building the paged-attention kernel (once per machine)", extra={"dir": str(directory)})
                from torch.utils.cpp_extension import load as build

                module = build(NAME, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                               build_directory=str(directory), verbose=verbose)
        except Exception as exc:  # any build or import failure means the plain path
            _reason["why"] = f"build failed: {type(exc).__name__}: {str(exc)[:300]}"
            module = None
    if module is None:
        log.warning("paged-attention kernel unavailable: attending on the plain torch path",
                    extra={"reason": _reason.get("why", "")})
    _loaded["module"] = module
    return module


def why_not() -> str:
    return _reason.get("why", "")


if __name__ == "__main__":  # `python -m model.paged_kernel`: build (or find) the kernel now
    logging.basicConfig(level=logging.INFO)
    print("paged-attention kernel:", "ready" if load(verbose=True) is not None else f"unavailable ({why_not()})")
