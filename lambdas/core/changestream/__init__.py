"""The Debezium change stream: connector settings, event parsing, type conversion, the applier."""
