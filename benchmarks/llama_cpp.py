"""llama.cpp, the peer of `make bench` on CPU: its `llama-server` and `llama-quantize` built once from the
llama.cpp vendored in llama-cpp-python's source distribution (PyPI), and our checkpoints' Hugging Face folders
converted to GGUF by its own `convert_hf_to_gguf.py`.

    python -m benchmarks.llama_cpp build          # ~/.cache/attnserve/llama.cpp-<version>/bin/ (once)
    python -m benchmarks.llama_cpp convert FOLDER --outtype f32 --out FILE.gguf
    python -m benchmarks.llama_cpp where          # the binaries' folder, or why there are none

The build: `pip download --no-deps --no-binary :all: llama-cpp-python==<version>`, the sdist's
`vendor/llama.cpp` extracted beside it, CMake (Release, GGML_NATIVE, static libraries, no CURL/OpenSSL, no web
UI, no tests or examples), only the two targets, `-j2` under `nice -n 10`. Nothing is rebuilt while both
binaries are in the cache; nothing is kept in the repository."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python's version; its sdist vendors llama.cpp
BINARIES = ("llama-server", "llama-quantize")
OUTTYPES = ("f32", "f16", "q8_0")


class Unavailable(RuntimeError):
    """llama.cpp cannot be built or run here (no compiler, no cmake, no package index, ...)."""


def cache_dir(version: str = VERSION) -> Path:
    root = os.environ.get("ATTNSERVE_LLAMA_CPP_DIR")
    return Path(root).expanduser() if root else Path("~/.cache/attnserve").expanduser() / f"llama.cpp-{version}"


def bin_dir(version: str = VERSION) -> Path:
    return cache_dir(version) / "bin"


def source_dir(version: str = VERSION) -> Path:
    """The vendored llama.cpp sources (convert_hf_to_gguf.py and gguf-py live here)."""
    return cache_dir(version) / "src" / "llama.cpp"


def binary(name: str, version: str = VERSION) -> Path | None:
    path = bin_dir(version) / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def built(version: str = VERSION) -> bool:
    return all(binary(b, version) for b in BINARIES) and (source_dir(version) / "convert_hf_to_gguf.py").is_file()


def _run(cmd: list[str], log: Path, progress: bool, cwd: Path | None = None) -> None:
    """Run a build step, its output appended to `log`; cmake's progress lines ("[ 42%] ...") echoed to stderr."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if progress and (line.startswith("[") or line.startswith("-- Build files")):
                sys.stderr.write("  " + line.rstrip()[:150] + "\n")
        if proc.wait() != 0:
            tail = log.read_text().splitlines()[-15:]
            raise Unavailable(f"`{' '.join(cmd[:4])} ...` failed ({proc.returncode}); see {log}:\n" + "\n".join(tail))


def _fetch_sources(version: str, log: Path, progress: bool) -> Path:
    """The sdist's vendor/llama.cpp, extracted once into the cache."""
    src = source_dir(version)
    if (src / "CMakeLists.txt").is_file():
        return src
    root = cache_dir(version)
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        if progress:
            sys.stderr.write(f"downloading llama-cpp-python {version}'s source distribution (~77 MB) from PyPI\n")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--disable-pip-version-check", "-d", str(root), f"llama-cpp-python=={version}"], log, progress)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    tmp = src.with_name("llama.cpp.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and (m.isfile() or m.isdir()):
                m.name = m.name[len(prefix):]
                members.append(m)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
            tar.extractall(tmp, members=members, filter="data")
        else:
            tar.extractall(tmp, members=members)  # PyPI's sdist; only files and folders under the prefix
    tmp.rename(src)
    return src


def build(version: str = VERSION, jobs: int = 2, progress: bool = True) -> Path:
    """llama-server and llama-quantize in the cache (built when either is missing); their folder."""
    if built(version):
        return bin_dir(version)
    missing = [t for t in ("cmake", "c++", "cc") if shutil.which(t) is None]
    if missing:
        raise Unavailable(f"cannot build llama.cpp: {', '.join(missing)} not found")
    root = cache_dir(version)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    start = time.monotonic()
    src = _fetch_sources(version, log, progress)
    build_dir = root / "build"
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run([*nice, "cmake", "-S", str(src), "-B", str(build_dir), *gen, "-DCMAKE_BUILD_TYPE=Release",
          "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
          "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON"], log, progress)
    _run([*nice, "cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs), "--target",
          *BINARIES], log, progress)
    out = bin_dir(version)
    out.mkdir(exist_ok=True)
    for name in BINARIES:
        shutil.copy2(build_dir / "bin" / name, out / name)
    (root / "BUILD_SECONDS").write_text(f"{time.monotonic() - start:.0f}\n")
    if progress:
        sys.stderr.write(f"built {', '.join(BINARIES)} in {time.monotonic() - start:.0f} s: {out}\n")
    return out


def ensure(version: str = VERSION, progress: bool = True) -> Path:
    """The binaries' folder, building them if needed; Unavailable says why there are none."""
    try:
        return build(version, progress=progress)
    except OSError as e:
        raise Unavailable(f"cannot build llama.cpp: {e}") from e


# --- weights ----------------------------------------------------------------------------------------------------


def convert(hf_folder: Path, outtype: str, out: Path, version: str = VERSION) -> Path:
    """`hf_folder` (a GPT-2 or Llama folder) as a GGUF file of `outtype` (f32, f16 or q8_0), by llama.cpp's own
    converter; made once per source (a SOURCE stamp beside it names the folder's weights and their mtime)."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} not one of {OUTTYPES}")
    weights = hf_folder / "model.safetensors"
    source = f"{hf_folder.resolve()} {weights.stat().st_mtime_ns} {outtype} {version}"
    stamp = out.with_name(out.name + ".SOURCE")
    if out.is_file() and stamp.is_file() and stamp.read_text() == source:
        return out
    src = source_dir(version)
    script = src / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise Unavailable(f"llama.cpp's converter is not in {src}: run `python -m benchmarks.llama_cpp build`")
    out.parent.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parent.parent  # benchmarks.gguf_convert: the converter, mended for GPT-2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(src), str(repo)])}
    tmp = out.with_name(out.name + ".partial")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gguf_convert", str(hf_folder), "--outtype", outtype,
                           "--outfile", str(tmp)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise Unavailable(f"convert_hf_to_gguf.py failed on {hf_folder.name} ({outtype}):\n{tail}")
    tmp.rename(out)
    stamp.write_text(source)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.llama_cpp", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build llama-server and llama-quantize into the cache (once)")
    b.add_argument("--jobs", type=int, default=2)
    sub.add_parser("where", help="print the binaries' folder (exit 1 when they are not built)")
    c = sub.add_parser("convert", help="a Hugging Face folder as GGUF")
    c.add_argument("folder", type=Path)
    c.add_argument("--outtype", choices=OUTTYPES, default="f32")
    c.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        if a.cmd == "build":
            print(build(jobs=a.jobs, progress=True))
        elif a.cmd == "where":
            if not built():
                sys.exit(f"not built: `python -m benchmarks.llama_cpp build` makes {bin_dir()}")
            print(bin_dir())
        else:
            print(convert(a.folder, a.outtype, a.out))
    except Unavailable as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
