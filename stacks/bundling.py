"""The Lambda asset, bundled locally (no Docker): pip installs requirements.txt as manylinux
wheels for the Lambda runtime into a folder, and the `lambdas` package is copied beside them.

The bundle is cached by a hash of requirements.txt, every file of `lambdas/` and the target
platform, in `$ZDM_BUNDLE_CACHE` (default `~/.cache/zdm/lambda-bundles`): a synth that finds
the hash there copies (hard-links) the folder instead of running pip again. The asset's hash
is the same hash, so CDK also skips staging when cdk.out already holds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import jsii
from aws_cdk import aws_lambda as lambda_

ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSION = "3.12"  # the functions' runtime (Runtime.PYTHON_3_12)
PLATFORM = "manylinux2014_x86_64"  # Architecture.X86_64
# Also newer wheels (confluent-kafka ships manylinux_2_28 only): the python3.12 runtime runs on
# Amazon Linux 2023 (glibc 2.34), which loads them.
PLATFORMS = (PLATFORM, "manylinux_2_28_x86_64")
BUNDLER_VERSION = "1"  # bump to invalidate every cached bundle
MANIFEST = ".zdm-bundle.json"


def _source_files() -> list[Path]:
    return sorted(
        p
        for p in (ROOT / "lambdas").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )


def bundle_hash() -> str:
    digest = hashlib.sha256()
    for part in (BUNDLER_VERSION, PYTHON_VERSION, *PLATFORMS):
        digest.update(part.encode() + b"\0")
    digest.update((ROOT / "requirements.txt").read_bytes() + b"\0")
    for path in _source_files():
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("ZDM_BUNDLE_CACHE", Path.home() / ".cache" / "zdm" / "lambda-bundles"))


def build_bundle(destination: Path) -> None:
    """pip install the pinned requirements for the Lambda platform, then copy the `lambdas` package."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--requirement",
            str(ROOT / "requirements.txt"),
            *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
            "--implementation",
            "cp",
            "--python-version",
            PYTHON_VERSION,
            "--only-binary=:all:",
            "--target",
            str(destination),
        ],
        check=True,
    )
    shutil.copytree(ROOT / "lambdas", destination / "lambdas", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def ensure_bundle() -> Path:
    """The cached bundle for the current sources, built once (atomically: a rename publishes it)."""
    key = bundle_hash()
    final = cache_dir() / key
    if (final / MANIFEST).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{key[:12]}.", dir=final.parent))
    try:
        build_bundle(work)
        manifest = {"hash": key, "python": PYTHON_VERSION, "platform": list(PLATFORMS)}
        (work / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
        try:
            work.rename(final)
        except OSError:  # another process published the same bundle first
            if not (final / MANIFEST).is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return final


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@jsii.implements(cdk.ILocalBundling)
class LocalBundler:
    """CDK's local bundling hook: copy the cached bundle into CDK's output folder."""

    def try_bundle(self, output_dir: str, *, image: cdk.DockerImage, **_: Any) -> bool:
        bundle = ensure_bundle()
        shutil.copytree(bundle, output_dir, copy_function=_link_or_copy, dirs_exist_ok=True)
        return True


def lambda_code() -> lambda_.Code:
    """One asset for every function: the handlers differ only by their `handler` string."""
    return lambda_.Code.from_asset(
        str(ROOT / "lambdas"),
        asset_hash_type=cdk.AssetHashType.CUSTOM,
        asset_hash=bundle_hash(),
        bundling=cdk.BundlingOptions(
            # Never pulled: LocalBundler always succeeds, CDK needs an image name all the same.
            image=cdk.DockerImage.from_registry("zdm-local-bundling-only"),
            local=LocalBundler(),
        ),
    )
