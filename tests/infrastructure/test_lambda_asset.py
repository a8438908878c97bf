"""The Lambda asset a synth builds (local bundling, no Docker): compiled dependencies for the
Lambda platform, the handlers, and a cache that spares a second pip run."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from stacks import bundling
from stacks.registry import HANDLERS


def _python312() -> str | None:
    """A working CPython 3.12 (the asset's cp312 extensions load only there); pyenv shims may not run."""
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")), reverse=True)
    candidates += [c for c in (shutil.which("python3.12"), "/usr/bin/python3.12") if c]
    for candidate in candidates:
        probe = subprocess.run(
            [candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], capture_output=True, timeout=30
        )
        if probe.returncode == 0:
            return candidate
    return None


def test_asset_holds_psycopg2_compiled_for_lambda_x86_64_python_312(bundled_asset: Path) -> None:
    extension = bundled_asset / "psycopg2" / "_psycopg.cpython-312-x86_64-linux-gnu.so"
    assert extension.is_file()
    header = extension.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit ELF
    assert int.from_bytes(header[18:20], "little") == 62  # EM_X86_64
    wheel = next(bundled_asset.glob("psycopg2_binary-*.dist-info")) / "WHEEL"
    tags = wheel.read_text()
    assert "cp312" in tags and "manylinux" in tags and "x86_64" in tags


def test_asset_holds_every_registered_handler(bundled_asset: Path) -> None:
    for spec in HANDLERS:
        assert (bundled_asset / "lambdas" / "handlers" / f"{spec.module}.py").is_file()
    assert not list(bundled_asset.rglob("__pycache__"))


def test_every_handler_imports_from_the_asset_under_python_312(bundled_asset: Path) -> None:
    python = _python312()
    if python is None:
        pytest.skip("no python3.12 interpreter on this machine to import the cp312 asset with")
    modules = ", ".join(repr(f"lambdas.handlers.{s.module}") for s in HANDLERS)
    code = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(bundled_asset)!r})\n"
        f"for name in [{modules}]:\n"
        "    module = importlib.import_module(name)\n"
        "    assert callable(module.handler), name\n"
        "import psycopg2, pydantic_core\n"
        f"assert psycopg2.__file__.startswith({str(bundled_asset)!r}), psycopg2.__file__\n"
        "print('ok', psycopg2.__version__)\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "AWS_DEFAULT_REGION": "eu-west-1", "POWERTOOLS_TRACE_DISABLED": "1"}
    result = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok 2.9")


def test_a_second_bundle_of_the_same_sources_comes_from_the_cache(
    bundled_asset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the bundle this session's synth built (its hash is in the asset's manifest)
    built = json.loads((bundled_asset / bundling.MANIFEST).read_text())["hash"]

    def no_pip(destination: Path) -> None:
        raise AssertionError("pip ran again for unchanged sources")

    # When the same sources are bundled again, with pip unavailable
    monkeypatch.setattr(bundling, "bundle_hash", lambda: built)
    monkeypatch.setattr(bundling, "build_bundle", no_pip)
    cached = bundling.ensure_bundle()
    # Then the cached folder is returned
    assert cached.name == built and (cached / bundling.MANIFEST).is_file()


def test_the_bundle_hash_follows_requirements_and_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lambdas").mkdir()
    (tmp_path / "lambdas" / "a.py").write_text("x = 1\n")
    (tmp_path / "requirements.txt").write_text("psycopg2-binary==2.9.13\n")
    monkeypatch.setattr(bundling, "ROOT", tmp_path)
    first = bundling.bundle_hash()
    (tmp_path / "lambdas" / "__pycache__").mkdir()
    (tmp_path / "lambdas" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    assert bundling.bundle_hash() == first  # bytecode does not count
    (tmp_path / "lambdas" / "a.py").write_text("x = 2\n")
    second = bundling.bundle_hash()
    assert second != first
    (tmp_path / "requirements.txt").write_text("psycopg2-binary==2.9.12\n")
    assert bundling.bundle_hash() != second
