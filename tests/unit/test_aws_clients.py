"""The handlers' AWS clients ride out throttling inside a step: a Route53 change throttled twice still lands."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core.botocore_stubber import MockRawResponse

from lambdas.core.routers.route53 import Route53Router
from lambdas.handlers.runtime import AWS_MAX_ATTEMPTS, aws_client

SOURCE = "shop-pg13.cluster-abc.eu-west-1.rds.amazonaws.com"
TARGET = "shop-pg16.cluster-def.eu-west-1.rds.amazonaws.com"
THROTTLED = (
    b'<?xml version="1.0"?>\n<ErrorResponse xmlns="https://route53.amazonaws.com/doc/2013-04-01/">'
    b"<Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>"
    b"<RequestId>zdm-test</RequestId></ErrorResponse>"
)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    aws_client.cache_clear()
    with mock_aws():
        yield
    aws_client.cache_clear()


def stack_zone(client: Any) -> str:
    """The zone stacks/traffic.py creates: a writer record and a weighted reader pair."""
    zone_id: str = client.create_hosted_zone(
        Name="db.internal",
        CallerReference="zdm-test",
        HostedZoneConfig={"PrivateZone": True},
        VPC={"VPCRegion": "eu-west-1", "VPCId": "vpc-0123456789abcdef0"},
    )["HostedZone"]["Id"]

    def cname(name: str, value: str, **extra: Any) -> dict[str, Any]:
        record = {"Name": name, "Type": "CNAME", "TTL": 5, "ResourceRecords": [{"Value": value}], **extra}
        return {"Action": "CREATE", "ResourceRecordSet": record}

    changes = [
        cname("writer.db.internal", SOURCE),
        cname("reader.db.internal", SOURCE, SetIdentifier="source", Weight=100),
        cname("reader.db.internal", TARGET, SetIdentifier="target", Weight=0),
    ]
    client.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": changes})
    return zone_id


def throttle_changes(client: Any, times: int) -> list[str]:
    """Route53 answers the client's next `times` ChangeResourceRecordSets with Throttling (HTTP 400), as it does
    past five requests a second; returns the list that counts them."""
    throttled: list[str] = []

    def answer(request: Any, **_: Any) -> AWSResponse | None:
        if len(throttled) >= times:
            return None  # on to moto
        throttled.append(request.url)
        return AWSResponse(request.url, 400, {"Content-Type": "text/xml"}, MockRawResponse(THROTTLED))

    client.meta.events.register_first("before-send.route53.ChangeResourceRecordSets", answer)
    return throttled


def test_a_read_shift_throttled_twice_by_route53_is_retried_and_lands(aws: None) -> None:
    # Given the handlers' Route53 client and the stack's zone
    client = aws_client("route53")
    zone_id = stack_zone(client)
    router = Route53Router(client, hosted_zone_id=zone_id, zone_name="db.internal", ttl_seconds=5, poll_interval=0)
    # When Route53 throttles the read shift's change twice
    throttled = throttle_changes(client, 2)
    router.set_read_weight(50)
    # Then the change was retried inside the call (the same throttle fails a client that does not retry: below)
    # and landed
    assert len(throttled) == 2
    assert router.state().read_weight == 50
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": AWS_MAX_ATTEMPTS}


def test_without_the_retries_the_same_throttle_fails_the_step(aws: None) -> None:
    # Given a client that does not retry (what the throttle above would otherwise do to a step)
    client = boto3.client("route53", config=Config(retries={"mode": "standard", "total_max_attempts": 1}))
    zone_id = stack_zone(client)
    router = Route53Router(client, hosted_zone_id=zone_id, zone_name="db.internal", ttl_seconds=5, poll_interval=0)
    throttled = throttle_changes(client, 1)
    # Then the read shift fails on it (moto applies a throttled change all the same: its stand-in answer comes
    # first, but every before-send handler runs, so only the error is checked here)
    with pytest.raises(ClientError, match=r"Throttling.*max retries: 0"):
        router.set_read_weight(50)
    assert len(throttled) == 1
