"""The Route53 router against moto's Route53, in the zone layout stacks/traffic.py creates: a plain
writer record (source until cutover) and a weighted reader pair (source 100, target 0)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from lambdas.core.routers.base import RouterError, Side
from lambdas.core.routers.route53 import Route53Router

SOURCE = "shop-pg13.cluster-abc.eu-west-1.rds.amazonaws.com"
TARGET = "shop-pg16.cluster-def.eu-west-1.rds.amazonaws.com"


class Recording:
    """Moto's client, with every call recorded and GetChange answering PENDING a few times first
    (moto reports INSYNC at once; Route53 takes tens of seconds)."""

    def __init__(self, client: Any, pending_polls: int = 0) -> None:
        self._client = client
        self.pending_polls = pending_polls
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def change_resource_record_sets(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("change_resource_record_sets", kwargs))
        response: dict[str, Any] = self._client.change_resource_record_sets(**kwargs)
        return response

    def get_change(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("get_change", kwargs))
        response: dict[str, Any] = self._client.get_change(**kwargs)
        if self.pending_polls > 0:
            self.pending_polls -= 1
            response = {**response, "ChangeInfo": {**response["ChangeInfo"], "Status": "PENDING"}}
        return response

    def list_resource_record_sets(self, **kwargs: Any) -> dict[str, Any]:
        response: dict[str, Any] = self._client.list_resource_record_sets(**kwargs)
        return response


def record(name: str, value: str, **extra: Any) -> dict[str, Any]:
    return {
        "Action": "CREATE",
        "ResourceRecordSet": {"Name": name, "Type": "CNAME", "TTL": 5, "ResourceRecords": [{"Value": value}], **extra},
    }


@pytest.fixture
def zone() -> Iterator[tuple[Any, str]]:
    with mock_aws():
        client = boto3.client("route53", region_name="us-east-1")
        created = client.create_hosted_zone(
            Name="db.internal",
            CallerReference="zdm-test",
            HostedZoneConfig={"PrivateZone": True, "Comment": "migration"},
            VPC={"VPCRegion": "eu-west-1", "VPCId": "vpc-0123456789abcdef0"},
        )
        zone_id = created["HostedZone"]["Id"]
        # What the stack creates (stacks/traffic.py)
        client.change_resource_record_sets(
            HostedZoneId=zone_id,
            ChangeBatch={
                "Changes": [
                    record("writer.db.internal", SOURCE),
                    record("reader.db.internal", SOURCE, SetIdentifier="source", Weight=100),
                    record("reader.db.internal", TARGET, SetIdentifier="target", Weight=0),
                ]
            },
        )
        yield client, zone_id


def make_router(client: Any, zone_id: str, **kwargs: Any) -> Route53Router:
    return Route53Router(
        client, hosted_zone_id=zone_id, zone_name="db.internal", ttl_seconds=5, poll_interval=0, **kwargs
    )


def records(client: Any, zone_id: str, name: str) -> dict[str, tuple[int | None, str]]:
    found = client.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    return {
        r.get("SetIdentifier", "-"): (r.get("Weight"), r["ResourceRecords"][0]["Value"])
        for r in found
        if r["Name"] == name and r["Type"] == "CNAME"
    }


def test_reads_move_in_steps_and_the_writer_at_once(zone: tuple[Any, str]) -> None:
    client, zone_id = zone
    recording = Recording(client)
    # Given the stack's records (the router reads both addresses from the reader pair)
    router = make_router(recording, zone_id)
    assert router.state().writer is Side.SOURCE and router.state().read_weight == 0
    # When reads shift in steps
    seen = []
    for step in (10, 50, 100):
        router.set_read_weight(step)
        seen.append(records(client, zone_id, "reader.db.internal."))
    # Then each step is a weighted pair summing to 100, and the writer never moved
    assert [(w["source"][0], w["target"][0]) for w in seen] == [(90, 10), (50, 50), (0, 100)]
    assert all((w["source"][1], w["target"][1]) == (SOURCE, TARGET) for w in seen)
    assert router.state().writer is Side.SOURCE and router.state().read_weight == 100
    # When the writer switches
    recording.calls.clear()
    router.switch_writer(Side.TARGET)
    # Then the one writer record changed value in a single change: never two writers
    batches = [kwargs for name, kwargs in recording.calls if name == "change_resource_record_sets"]
    assert len(batches) == 1
    (change,) = batches[0]["ChangeBatch"]["Changes"]
    assert change["Action"] == "UPSERT" and "SetIdentifier" not in change["ResourceRecordSet"]
    assert change["ResourceRecordSet"]["TTL"] == 5
    assert records(client, zone_id, "writer.db.internal.") == {"-": (None, TARGET)}
    assert router.state().writer is Side.TARGET
    # And switching again is idempotent; switching back restores the source
    router.switch_writer(Side.TARGET)
    assert router.state().writer is Side.TARGET
    router.switch_writer(Side.SOURCE)
    assert records(client, zone_id, "writer.db.internal.") == {"-": (None, SOURCE)}


def test_addresses_can_be_given_and_must_come_in_pairs(zone: tuple[Any, str]) -> None:
    client, zone_id = zone
    router = make_router(client, zone_id, source_value=SOURCE, target_value=TARGET)
    router.switch_writer(Side.TARGET)
    assert router.state().writer is Side.TARGET
    with pytest.raises(RouterError, match="both"):
        make_router(client, zone_id, source_value=SOURCE)


def test_a_zone_without_the_reader_pair_names_what_is_missing() -> None:
    with mock_aws():
        client = boto3.client("route53", region_name="us-east-1")
        zone_id = client.create_hosted_zone(Name="empty.internal", CallerReference="x")["HostedZone"]["Id"]
        router = Route53Router(client, hosted_zone_id=zone_id, zone_name="empty.internal")
        with pytest.raises(RouterError, match=r"reader records reader\.empty\.internal\. .* are not in zone"):
            router.switch_writer(Side.TARGET)


def test_each_change_is_waited_for_until_insync(zone: tuple[Any, str]) -> None:
    client, zone_id = zone
    recording = Recording(client, pending_polls=3)
    sleeps: list[float] = []
    router = make_router(recording, zone_id, sleep=sleeps.append)
    # When the writer switches while Route53 reports PENDING three times
    router.switch_writer(Side.TARGET)
    # Then the router polled GetChange until INSYNC
    polls = [kwargs["Id"] for name, kwargs in recording.calls if name == "get_change"]
    assert len(polls) == 4 and len(set(polls)) == 1
    assert len(sleeps) == 3


def test_a_change_that_stays_pending_times_out_with_its_id(zone: tuple[Any, str]) -> None:
    client, zone_id = zone
    now = [0.0]

    def tick(seconds: float) -> None:
        now[0] += 10

    router = make_router(
        Recording(client, pending_polls=1000), zone_id, clock=lambda: now[0], sleep=tick, insync_timeout=30
    )
    with pytest.raises(RouterError, match="still PENDING after 30s"):
        router.set_read_weight(10)


def test_dns_cannot_hold_clients(zone: tuple[Any, str]) -> None:
    client, zone_id = zone
    router = make_router(client, zone_id)
    hold = router.begin_hold()
    assert hold.done() and not hold.holding and not router.holds_clients
    hold.cancel()
    router.release()


def test_addresses_become_a_records_and_mixed_values_are_refused(zone: tuple[Any, str]) -> None:
    client, zone_id = zone
    router = Route53Router(
        client,
        hosted_zone_id=zone_id,
        zone_name="db.internal",
        writer_record="ip-writer",
        source_value="10.0.0.5",
        target_value="10.0.1.5",
    )
    router.switch_writer(Side.SOURCE)
    found = client.list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    assert {r["Type"] for r in found if r["Name"] == "ip-writer.db.internal."} == {"A"}
    with pytest.raises(RouterError, match="both be host names or both be addresses"):
        Route53Router(
            client, hosted_zone_id=zone_id, zone_name="db.internal", source_value="10.0.0.5", target_value=TARGET
        )


# -- names and weights as Route 53 keeps them ---------------------------------------------------

REGION = "eu-west-1"


def _zone(client: Any, name: str) -> str:
    return str(
        client.create_hosted_zone(
            Name=name,
            CallerReference=f"zdm-{name}",
            HostedZoneConfig={"PrivateZone": True, "Comment": "migration"},
            VPC={"VPCRegion": REGION, "VPCId": "vpc-0123456789abcdef0"},
        )["HostedZone"]["Id"]
    )


def _cname(name: str, value: str, **extra: Any) -> dict[str, Any]:
    return {
        "Action": "CREATE",
        "ResourceRecordSet": {"Name": name, "Type": "CNAME", "TTL": 5, "ResourceRecords": [{"Value": value}], **extra},
    }


class LowercasingRoute53:
    """Moto's Route53, answering names the way Route53 stores them: in lowercase
    ("Amazon Route 53 stores alphabetic characters as lowercase letters (a-z), regardless of how you
    specify them", docs.aws.amazon.com/Route53/latest/DeveloperGuide/DomainNameFormat.html)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def create_hosted_zone(self, **kwargs: Any) -> dict[str, Any]:
        response: dict[str, Any] = self._client.create_hosted_zone(**{**kwargs, "Name": kwargs["Name"].lower()})
        return response

    def change_resource_record_sets(self, **kwargs: Any) -> dict[str, Any]:
        batch = kwargs["ChangeBatch"]
        changes = [
            {**c, "ResourceRecordSet": {**c["ResourceRecordSet"], "Name": c["ResourceRecordSet"]["Name"].lower()}}
            for c in batch["Changes"]
        ]
        response: dict[str, Any] = self._client.change_resource_record_sets(
            **{**kwargs, "ChangeBatch": {**batch, "Changes": changes}}
        )
        return response

    def list_resource_record_sets(self, **kwargs: Any) -> dict[str, Any]:
        page: dict[str, Any] = self._client.list_resource_record_sets(**kwargs)
        return {**page, "ResourceRecordSets": [{**r, "Name": r["Name"].lower()} for r in page["ResourceRecordSets"]]}


def test_a_zone_name_with_capitals_is_found_as_route53_lists_it() -> None:
    with mock_aws():
        client = LowercasingRoute53(boto3.client("route53", region_name="us-east-1"))
        zone_id = _zone(client, "Shop.Internal")
        # Given the stack's records in a zone the migration file names with capitals (stored in lowercase)
        client.change_resource_record_sets(
            HostedZoneId=zone_id,
            ChangeBatch={
                "Changes": [
                    _cname("writer.Shop.Internal", "src.example.com"),
                    _cname("reader.Shop.Internal", "src.example.com", SetIdentifier="source", Weight=100),
                    _cname("reader.Shop.Internal", "tgt.example.com", SetIdentifier="target", Weight=0),
                ]
            },
        )
        router = Route53Router(client, hosted_zone_id=zone_id, zone_name="Shop.Internal", poll_interval=0)
        # When the router reads its state / Then it finds the writer on the source and no reads on the target
        state = router.state()
        assert (state.writer, state.read_weight) == (Side.SOURCE, 0)


def test_all_zero_weights_are_an_even_split_not_unknown() -> None:
    # Route53: "If you set Weight to 0 for all records in the group, traffic is routed to all
    # resources with equal probability" (ResourceRecordSet Weight, API reference)
    with mock_aws():
        client = boto3.client("route53", region_name="us-east-1")
        zone_id = _zone(client, "db.internal")
        client.change_resource_record_sets(
            HostedZoneId=zone_id,
            ChangeBatch={
                "Changes": [
                    _cname("writer.db.internal", "src.example.com"),
                    _cname("reader.db.internal", "src.example.com", SetIdentifier="source", Weight=0),
                    _cname("reader.db.internal", "tgt.example.com", SetIdentifier="target", Weight=0),
                ]
            },
        )
        router = Route53Router(client, hosted_zone_id=zone_id, zone_name="db.internal", poll_interval=0)
        assert router.state().read_weight == 50
