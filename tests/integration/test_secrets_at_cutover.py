"""The cutover (its reverse subscription is created on the source) and its failure keep the password out of
server logs, results and errors (servers that require passwords)."""

from __future__ import annotations

import pytest
from cutover_env import Shop, clean_up, start_shop

from lambdas.core.cutover import CutoverRunner
from rehearsal.servers import PostgresServer, free_port
from tests.integration.secret_env import PASSWORD, LogMark, app_dsn, exc_text, secure_pair


class SecureShop(Shop):
    @property
    def src(self) -> str:
        return app_dsn(self.source, self.dbname)

    @property
    def tgt(self) -> str:
        return app_dsn(self.target, self.dbname)


def secure_shop(source: PostgresServer, target: PostgresServer, dbname: str = "shop") -> Shop:
    for server in (source, target):
        server.create_database(dbname)
    return start_shop(source, target, dbname, 2000, forward=False, kind=SecureShop)


@pytest.mark.parametrize(
    "logging",
    [{"log_statement": "ddl"}, {}, {"shared_preload_libraries": "pgaudit", "pgaudit.log": "ddl"}],
    ids=["log_statement=ddl", "defaults", "pgaudit.log=ddl"],
)
def test_cutover_and_rollback_keep_password_out_of_server_logs(logging: dict[str, str]) -> None:
    # Given a replicating shop on servers that require a password
    with secure_pair("audit-cut", settings=logging) as (source, target):
        mark = LogMark(source, target)
        shop = secure_shop(source, target)
        try:
            shop.forward_engine().start()
            shop.wait_caught_up()
            # When the cutover runs (creating the reverse subscription on the source) and is rolled back
            done = shop.runner(fence_grace_seconds=0.5).cutover()
            back = shop.runner(fence_grace_seconds=0.5).rollback()
        finally:
            clean_up(shop)
        # Then both succeeded and neither server logged the password
        assert done.status == "done" and back.status == "done"
        assert PASSWORD not in str(done.to_json()) + str(back.to_json())
        assert PASSWORD not in mark.text()


def test_cutover_whose_reverse_subscription_fails_keeps_password_out() -> None:
    # Given a replicating shop, and a conninfo for the reverse subscription naming a port nobody listens on
    with secure_pair("audit-cutf") as (source, target):
        mark = LogMark(source, target)
        shop = secure_shop(source, target)
        try:
            shop.forward_engine().start()
            shop.wait_caught_up()
            bad = f"host=127.0.0.1 port={free_port()} dbname=shop user=app password={PASSWORD}"
            runner = CutoverRunner(
                shop.src, shop.tgt, shop.router, shop.plan(fence_grace_seconds=0.5), target_conninfo=bad
            )
            # When the cutover runs and creating the back replication fails
            with pytest.raises(Exception) as info:
                runner.cutover()
            status = runner.status()
        finally:
            clean_up(shop)
        # Then neither the error, the status nor the server logs hold the password
        assert PASSWORD not in exc_text(info.value)
        assert PASSWORD not in str(status)
        assert PASSWORD not in mark.text(), mark.text()
