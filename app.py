#!/usr/bin/env python3
"""CDK entry: `cdk synth|deploy -c migration=migrations/<name>.yaml` builds one stack per migration.

cdk-nag's AwsSolutions pack runs as a validation plugin: a finding that is not acknowledged
(with its reason, next to the resource) fails the synth.
"""

from __future__ import annotations

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from lambdas.core.config import load_migration
from stacks.migration_stack import MigrationStack, stack_name_for

app = cdk.App()
migration_path = app.node.try_get_context("migration") or "migrations/example.yaml"
migration = load_migration(migration_path)
MigrationStack(app, stack_name_for(migration), migration=migration)
cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app, write_suppressions_to_cloud_formation=True))
app.synth()
