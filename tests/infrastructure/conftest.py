"""Synthesized stacks, shared by the infrastructure tests (each synth runs once per session).

Asset bundling is skipped here (`aws:cdk:bundling-stacks` empty) except in `bundled_asset`,
which synthesizes with the real local bundler once: its pip run is cached by
stacks/bundling.py, so a second session with the same sources copies the cached bundle.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import pytest
import yaml
from aws_cdk.assertions import Template

from lambdas.core.config import Migration, load_migration, parse_migration
from stacks.migration_stack import MigrationStack, stack_name_for

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("migrations/example.yaml", "migrations/serverless-proxy.yaml", "migrations/debezium.yaml")


@dataclass
class Synth:
    migration: Migration
    app: cdk.App
    stack: MigrationStack
    template: Template

    @property
    def json(self) -> dict[str, Any]:
        return self.template.to_json()

    def resources(self, kind: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.json["Resources"].items() if v["Type"] == kind}


def synth_migration(migration: Migration, *, bundle: bool = False, outdir: str | None = None) -> Synth:
    context: dict[str, Any] = {} if bundle else {"aws:cdk:bundling-stacks": []}
    app = cdk.App(context=context, outdir=outdir)
    stack = MigrationStack(app, stack_name_for(migration), migration=migration)
    return Synth(migration, app, stack, Template.from_stack(stack))


def load(path: str, **changes: Any) -> Migration:
    """A shipped migration file with top-level sections replaced or merged (one level deep)."""
    data = yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))
    data = copy.deepcopy(data)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_migration(data, path)


_cache: dict[str, Synth] = {}


@pytest.fixture(scope="session")
def synth() -> Callable[..., Synth]:
    """synth(path, **section changes) -> Synth, memoized per argument set."""

    def run(path: str, **changes: Any) -> Synth:
        key = repr((path, sorted((k, repr(v)) for k, v in changes.items())))
        if key not in _cache:
            migration = load(path, **changes) if changes else load_migration(ROOT / path)
            _cache[key] = synth_migration(migration)
        return _cache[key]

    return run


@pytest.fixture(scope="session")
def example(synth: Callable[..., Synth]) -> Synth:
    return synth("migrations/example.yaml")


@pytest.fixture(scope="session")
def serverless(synth: Callable[..., Synth]) -> Synth:
    return synth("migrations/serverless-proxy.yaml")


@pytest.fixture(scope="session")
def debezium(synth: Callable[..., Synth]) -> Synth:
    return synth("migrations/debezium.yaml")


@pytest.fixture(scope="session", params=SHIPPED)
def shipped(request: pytest.FixtureRequest, synth: Callable[..., Synth]) -> Synth:
    return synth(request.param)


@pytest.fixture(scope="session")
def bundled_asset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The Lambda asset folder a real synth stages (local bundling, cached across sessions)."""
    outdir = tmp_path_factory.mktemp("cdk.out")
    result = synth_migration(load_migration(ROOT / "migrations/example.yaml"), bundle=True, outdir=str(outdir))
    result.app.synth()
    assets = [p for p in outdir.glob("asset.*") if (p / "lambdas").is_dir()]
    assert len(assets) == 1, f"expected one Lambda asset in {outdir}, found {assets}"
    yield assets[0]
