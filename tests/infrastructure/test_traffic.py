"""Traffic construct: TLS-only RDS proxies for both sides; the writer and weighted reader records."""

from __future__ import annotations

from aws_cdk.assertions import Match

from tests.infrastructure.conftest import Synth


def test_both_proxies_require_tls_and_use_the_endpoint_secrets(shipped: Synth) -> None:
    proxies = [p["Properties"] for p in shipped.resources("AWS::RDS::DBProxy").values()]
    assert len(proxies) == 2
    secrets = {shipped.migration.source.secret_arn, shipped.migration.target.secret_arn}
    for proxy in proxies:
        assert proxy["RequireTLS"] is True
        assert proxy["DebugLogging"] is False
        assert proxy["EngineFamily"] == "POSTGRESQL"
        assert proxy["Auth"][0]["AuthScheme"] == "SECRETS" and proxy["Auth"][0]["SecretArn"] in secrets


def test_proxy_targets_are_the_file_clusters_or_instances(example: Synth, serverless: Synth) -> None:
    clusters = [
        g["Properties"].get("DBClusterIdentifiers") for g in example.resources("AWS::RDS::DBProxyTargetGroup").values()
    ]
    assert sorted(c[0] for c in clusters) == ["shop-orders-pg13", "shop-orders-pg16"]
    instances = [
        g["Properties"].get("DBInstanceIdentifiers")
        for g in serverless.resources("AWS::RDS::DBProxyTargetGroup").values()
    ]
    assert sorted(i[0] for i in instances) == ["shop-payments-pg12", "shop-payments-pg16"]


def test_rds_proxy_router_names_the_application_proxy(serverless: Synth) -> None:
    names = {p["Properties"]["DBProxyName"] for p in serverless.resources("AWS::RDS::DBProxy").values()}
    assert names == {"shop-payments-app", "shop-payments-app-target"}


def test_writer_record_and_weighted_readers_with_the_file_ttl(example: Synth) -> None:
    example.template.has_resource_properties(
        "AWS::Route53::RecordSet",
        {
            "Name": "writer.db.internal.",
            "Type": "CNAME",
            "TTL": "5",
            "HostedZoneId": "Z0123456789ABCDEFGHIJ",
            "Weight": Match.absent(),
        },
    )
    readers = [
        r["Properties"]
        for r in example.resources("AWS::Route53::RecordSet").values()
        if r["Properties"]["Name"] == "reader.db.internal."
    ]
    assert sorted((r["SetIdentifier"], r["Weight"]) for r in readers) == [("source", 100), ("target", 0)]
    example.template.resource_count_is("AWS::Route53::HostedZone", 0)  # the file's zone is used


def test_a_private_zone_is_created_in_the_new_vpc_when_the_file_has_none(serverless: Synth) -> None:
    serverless.template.has_resource_properties(
        "AWS::Route53::HostedZone",
        {"Name": "payments.internal.", "VPCs": [Match.object_like({"VPCRegion": "eu-west-1"})]},
    )
