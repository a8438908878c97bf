"""Traffic routers: one interface (`base.TrafficRouter`), one module per backend.

`router_for` builds the migration's router. AWS clients are passed in (the core never
creates them), so the same code runs in Lambda, in the rehearsal and in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg2.extensions

from lambdas.core.config import Endpoint, Migration
from lambdas.core.db import Connection, connect
from lambdas.core.routers.base import HoldHandle, NoHold, RouterError, RouterState, Side, TrafficRouter
from lambdas.core.routers.pgbouncer import PgbouncerBackend, PgbouncerRouter
from lambdas.core.routers.rds_proxy import ProxyTarget, RdsProxyRouter
from lambdas.core.routers.route53 import Route53Router

__all__ = [
    "HoldHandle",
    "NoHold",
    "PgbouncerBackend",
    "PgbouncerRouter",
    "ProxyTarget",
    "RdsProxyRouter",
    "Route53Router",
    "RouterError",
    "RouterState",
    "Side",
    "TrafficRouter",
    "router_for",
]


def _address(endpoint: Endpoint) -> tuple[str | None, int, str | None]:
    """Host, port and database of an endpoint, whichever form it has (never its credentials)."""
    if endpoint.dsn is not None:
        parts = psycopg2.extensions.parse_dsn(endpoint.dsn.get_secret_value())
        return parts.get("host"), int(parts.get("port", 5432)), parts.get("dbname")
    return endpoint.host, endpoint.port, endpoint.database


def _pgbouncer_backend(endpoint: Endpoint, override: str | None, side: Side) -> PgbouncerBackend:
    if override is not None:
        return PgbouncerBackend.parse(override, what=f"{side.value}_backend")
    host, port, dbname = _address(endpoint)
    if host is None or dbname is None:
        raise RouterError(
            f"router.pgbouncer.{side.value}_backend is needed: the {side.value} endpoint gives no host and database"
        )
    return PgbouncerBackend(host, port, dbname)


def _proxy_target(endpoint: Endpoint, side: Side) -> ProxyTarget:
    cluster = getattr(endpoint, "rds_cluster_identifier", None)
    instance = getattr(endpoint, "rds_instance_identifier", None)
    if cluster:
        return ProxyTarget(cluster, "cluster")
    if instance:
        return ProxyTarget(instance, "instance")
    raise RouterError(
        f"the rds-proxy router needs {side.value}.rds_cluster_identifier or {side.value}.rds_instance_identifier "
        "(the database it registers behind the proxy)"
    )


def router_for(
    migration: Migration,
    *,
    route53_client: Any | None = None,
    rds_client: Any | None = None,
    hosted_zone_id: str | None = None,
    connector: Callable[..., Connection] = connect,
) -> TrafficRouter:
    """The migration's router. pgbouncer needs its admin DSN and config path; route53 a Route53
    client; rds-proxy an RDS client (and a Route53 client when reads shift through weighted
    records). `hosted_zone_id` stands in for a zone the stack created (none in the file)."""
    settings = migration.router
    if settings.type == "pgbouncer":
        pgb = settings.pgbouncer
        if pgb.admin_dsn is None or pgb.config_path is None:
            raise RouterError(
                "the pgbouncer router needs router.pgbouncer.admin_dsn and router.pgbouncer.config_path "
                "(it PAUSEs through the admin console and repoints by rewriting the config)"
            )
        return PgbouncerRouter(
            pgb.admin_dsn.get_secret_value(),
            pgb.config_path,
            writer_alias=pgb.database_alias,
            reader_alias=pgb.reader_alias,
            source=_pgbouncer_backend(migration.source, pgb.source_backend, Side.SOURCE),
            target=_pgbouncer_backend(migration.target, pgb.target_backend, Side.TARGET),
            connector=connector,
            reconnect_seconds=pgb.reconnect_seconds,
        )
    r53 = settings.route53
    zone_id = r53.hosted_zone_id or hosted_zone_id

    def _route53() -> Route53Router:
        if route53_client is None:
            raise RouterError("a Route53 client is needed for weighted records")
        assert zone_id is not None
        # The addresses (a proxy's endpoint or the database's host) are read from the reader
        # pair the stack created in the zone.
        return Route53Router(
            route53_client,
            hosted_zone_id=zone_id,
            zone_name=r53.zone_name,
            writer_record=r53.writer_record,
            reader_record=r53.reader_record,
            ttl_seconds=r53.ttl_seconds,
            insync_timeout=r53.insync_timeout_seconds,
        )

    if settings.type == "route53":
        return _route53()
    proxy = settings.rds_proxy
    if rds_client is None:
        raise RouterError("an RDS client is needed for the rds-proxy router")
    assert proxy.proxy_name is not None
    return RdsProxyRouter(
        rds_client,
        proxy_name=proxy.proxy_name,
        source=_proxy_target(migration.source, Side.SOURCE),
        target=_proxy_target(migration.target, Side.TARGET),
        target_group=proxy.target_group_name,
        read_router=_route53() if zone_id is not None else None,
        registration_timeout=proxy.registration_timeout_seconds,
    )
