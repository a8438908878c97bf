"""A rollback before cutover keeps the target read-only while cached DNS answers may still send new
sessions there (Route 53 reader records in moto, a real PostgreSQL target)."""

from __future__ import annotations

import time
from typing import Any

import boto3
from moto import mock_aws

from lambdas.core.cutover import CutoverPlan, CutoverRunner
from lambdas.core.db import connect, fetch_value
from lambdas.core.engines.base import ReplicationStatus
from lambdas.core.engines.logical import ReplicationNames
from lambdas.core.fence import set_fence
from lambdas.core.routers.base import Side
from lambdas.core.routers.route53 import Route53Router

TTL = 2


class StoppedStream:
    """Stands for the forward change stream: the rollback only stops it."""

    stopped = False

    def stop(self) -> None:
        self.stopped = True

    def status(self) -> ReplicationStatus:  # pragma: no cover - not called by a rollback before cutover
        raise AssertionError

    def __getattr__(self, name: str) -> Any:  # pragma: no cover
        raise AssertionError(name)


class Timed(Route53Router):
    reads_left_target_at: float | None = None

    def set_read_weight(self, target_percent: int) -> None:
        super().set_read_weight(target_percent)
        if target_percent == 0:
            self.reads_left_target_at = time.monotonic()


def test_rollback_before_cutover_keeps_the_target_fenced_for_the_reader_ttl(fresh_dbs: tuple[str, str]) -> None:
    source_dsn, target_dsn = fresh_dbs
    with mock_aws():
        client = boto3.client("route53", region_name="us-east-1")
        zone_id = client.create_hosted_zone(
            Name="db.internal",
            CallerReference="zdm-ttl",
            HostedZoneConfig={"PrivateZone": True, "Comment": "m"},
            VPC={"VPCRegion": "eu-west-1", "VPCId": "vpc-0123456789abcdef0"},
        )["HostedZone"]["Id"]
        router = Timed(
            client,
            hosted_zone_id=zone_id,
            zone_name="db.internal",
            source_value="src.example.com",
            target_value="tgt.example.com",
            ttl_seconds=TTL,
            poll_interval=0,
        )
        router.switch_writer(Side.SOURCE)
        # Given half the reads on the target, which the read shift fenced (read-only by default)
        router.set_read_weight(50)
        target = connect(target_dsn)
        set_fence(target)
        target.close()
        runner = CutoverRunner(
            source_dsn,
            target_dsn,
            router,
            CutoverPlan("shop", (), ReplicationNames("zdm_shop"), ReplicationNames("zdm_shop_rev")),
            forward_stream=StoppedStream(),  # type: ignore[arg-type]
        )
        # When the alarm's rollback runs (before any cutover)
        result = runner.rollback()
        done = time.monotonic()
        assert result.kind == "before_cutover"
        # Then a session opened now (a client holding a cached reader answer: up to TTL seconds after
        # the change) is still read-only, or the fence was lifted only once the TTL had passed
        assert router.reads_left_target_at is not None
        late = connect(target_dsn)
        try:
            read_only = fetch_value(late, "SHOW default_transaction_read_only") == "on"
        finally:
            late.close()
        assert read_only or done - router.reads_left_target_at >= TTL, (
            f"target writable {done - router.reads_left_target_at:.3f}s after the reads left it (TTL {TTL}s)"
        )
