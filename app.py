#!/usr/bin/env python3
"""CDK entry: `cdk synth|deploy -c migration=migrations/<name>.yaml` builds one stack per migration."""

from __future__ import annotations

import aws_cdk as cdk

from lambdas.core.config import load_migration
from stacks.migration_stack import MigrationStack, stack_name_for

app = cdk.App()
migration_path = app.node.try_get_context("migration") or "migrations/example.yaml"
migration = load_migration(migration_path)
MigrationStack(app, stack_name_for(migration), migration=migration)
app.synth()
