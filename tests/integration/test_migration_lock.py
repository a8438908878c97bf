"""The migration's lock (one cutover, rollback or retire at a time) on a real server."""

from __future__ import annotations

from contextlib import closing

from lambdas.core.cutover import store
from lambdas.core.db import connect, fetch_value
from lambdas.core.fence import make_writable


def test_waiting_for_the_lock_leaves_the_sessions_own_lock_timeout_in_place(fresh_dbs: tuple[str, str]) -> None:
    # Given a control session (lock waits capped at 10 s) and another session holding the migration's lock
    _, tgt = fresh_dbs
    with closing(connect(tgt)) as holder, closing(connect(tgt)) as session:
        make_writable(session)
        assert store.try_lock(holder, "shop")
        # When the session waits for the lock in vain, then gets it once the holder is done
        assert not store.try_lock(session, "shop", wait_seconds=0.2)
        store.unlock(holder, "shop")
        assert store.try_lock(session, "shop", wait_seconds=0.2)
        # Then its lock_timeout is its own 10 s again, not the server's default (none: a later wait of the
        # rollback, on ALTER DATABASE say, could then last for ever)
        assert fetch_value(session, "SHOW lock_timeout") == "10s"


def test_a_session_holding_the_lock_has_the_server_probe_a_silent_client_within_a_minute(
    fresh_dbs: tuple[str, str],
) -> None:
    # Given a session over TCP that takes the lock
    _, tgt = fresh_dbs
    with closing(connect(tgt)) as session:
        assert store.try_lock(session, "shop")
        # Then the server probes the client after 30 s of silence, 3 times 10 s apart (not after the OS default 2 hours;
        # a vanished client itself is not simulated here)
        settings = [
            fetch_value(session, f"SHOW {name}")
            for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")
        ]
        assert settings == ["30", "10", "3"]
