"""The benchmarks' CPU meter: it counts the servers' work, not the client's, and backends that
have already exited (their time moves to the postmaster's reaped-children total)."""

from __future__ import annotations

import time

from bench.common import cpu_used
from lambdas.core.db import connect, fetch_value
from rehearsal.servers import PostgresServer

BUSY_QUERY = "SELECT count(*) FROM generate_series(1, 3000000) AS g WHERE g % 7 = 3"


def test_server_work_in_a_closed_session_is_counted_on_the_servers_and_client_work_on_the_client(
    pg_pair: tuple[PostgresServer, PostgresServer],
) -> None:
    # Given both servers, and a session that will do its work and exit inside the measured block
    servers = list(pg_pair)
    # When one server counts 3 million rows, and then the client spins on its own
    with cpu_used(servers) as on_server:
        conn = connect(servers[0].dsn())
        assert fetch_value(conn, BUSY_QUERY) == 428572
        conn.close()
        time.sleep(0.3)  # the postmaster reaps the backend
    with cpu_used(servers) as on_client:
        spin_until = time.process_time() + 0.3
        while time.process_time() < spin_until:
            pass
    # Then the servers' seconds carry the query, and the client's the spinning
    assert on_server.servers is not None and on_server.client is not None
    assert on_server.servers >= 0.05
    assert on_server.servers > 2 * on_server.client
    assert on_client.client is not None and on_client.client >= 0.3
    assert on_client.servers is not None and on_client.servers < on_client.client
