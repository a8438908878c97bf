"""One stack per migration. Replication, streaming, traffic, orchestration and monitoring
constructs join this stack as they land (see the open infrastructure issue)."""

from __future__ import annotations

from typing import Any

import aws_cdk as cdk
from constructs import Construct

from lambdas.core.config import Migration
from stacks.config import MigrationConfig


def stack_name_for(migration: Migration) -> str:
    return "Zdm-" + "".join(part.capitalize() for part in migration.name.split("-"))


class MigrationStack(cdk.Stack):
    def __init__(self, scope: Construct, construct_id: str, *, migration: Migration, **kwargs: Any) -> None:
        super().__init__(scope, construct_id, description=f"Zero-downtime migration {migration.name}", **kwargs)
        cdk.Tags.of(self).add("zdm:migration", migration.name)
        self.config = MigrationConfig(self, "Config", migration=migration)
