"""How validation re-checks a difference found while changes flow, per engine (no servers)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from lambdas.core.config import Migration
from lambdas.handlers.validate_plan import engine_replication


def migration(engine: str, **validation: Any) -> Migration:
    return Migration.model_validate(
        {
            "name": "shop",
            "source": {"dsn": "host=127.0.0.1 dbname=x user=postgres"},
            "target": {"dsn": "host=127.0.0.1 dbname=y user=postgres"},
            "engine": {"type": engine},
            "validation": validation,
        }
    )


def test_dms_differences_are_re_checked_within_the_file_s_timeout_and_the_chunk_function() -> None:
    # Given the file's 60 s re-check timeout: a re-check waits for the fence marker row, not for CloudWatch
    replication = engine_replication(migration("dms", recheck_timeout_seconds=60, recheck_attempts=3))
    # Then chunks re-check under dms, waiting up to the file's timeout
    assert replication is not None
    assert (replication.subscription, replication.timeout_seconds, replication.attempts) == ("DMS task", 60, 3)
    # And the attempts are capped so that every wait of a chunk fits the chunk function (780 s of its 900 s)
    longest = engine_replication(migration("dms", recheck_timeout_seconds=390, recheck_attempts=5))
    assert longest is not None and (longest.timeout_seconds, longest.attempts) == (390, 2)
    # And more than two re-checks' worth is refused by the file
    with pytest.raises(ValidationError, match="recheck_timeout_seconds"):
        migration("dms", recheck_timeout_seconds=900)


def test_debezium_waits_the_file_s_timeout_and_logical_is_planned_from_its_subscription() -> None:
    debezium = engine_replication(migration("debezium", recheck_timeout_seconds=45))
    assert debezium is not None and debezium.timeout_seconds == 45
    assert debezium.subscription == "change stream zdm_shop"
    assert engine_replication(migration("logical")) is None  # replication_of asks the target instead
