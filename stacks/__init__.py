"""CDK constructs, one per concern, composed by MigrationStack."""
