"""Network construct: the file's VPC or a new one with explicit zones; tight security groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aws_cdk.assertions import Match

from tests.infrastructure.conftest import Synth


def _rules(result: Synth, kind: str) -> list[dict[str, Any]]:
    return [r["Properties"] for r in result.resources(kind).values()]


def test_existing_vpc_is_used_by_id_and_no_vpc_is_created(example: Synth) -> None:
    example.template.resource_count_is("AWS::EC2::VPC", 0)
    proxies = example.resources("AWS::RDS::DBProxy")
    assert all(
        p["Properties"]["VpcSubnetIds"]
        == ["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60002", "subnet-0a1b2c3d4e5f60003"]
        for p in proxies.values()
    )


def test_new_vpc_has_the_file_zones_private_subnets_and_encrypted_flow_logs(serverless: Synth) -> None:
    serverless.template.has_resource_properties("AWS::EC2::VPC", {"CidrBlock": "10.81.0.0/16"})
    zones = {s["Properties"]["AvailabilityZone"] for s in serverless.resources("AWS::EC2::Subnet").values()}
    assert zones == {"eu-west-1a", "eu-west-1b"}
    serverless.template.resource_count_is("AWS::EC2::NatGateway", 2)
    serverless.template.has_resource_properties(
        "AWS::EC2::FlowLog", {"TrafficType": "ALL", "LogDestinationType": "cloud-watch-logs"}
    )
    serverless.template.has_resource_properties(
        "AWS::Logs::LogGroup", {"LogGroupName": "/zdm/shop-payments/vpc-flow-logs", "KmsKeyId": Match.any_value()}
    )


def test_no_security_group_opens_ingress_to_the_internet(shipped: Synth) -> None:
    for group in shipped.resources("AWS::EC2::SecurityGroup").values():
        for rule in group["Properties"].get("SecurityGroupIngress", []):
            assert rule.get("CidrIp") != "0.0.0.0/0"
        # every group of the stack restricts its egress (CDK's allow-all egress rule is absent)
        assert group["Properties"].get("SecurityGroupEgress") != [
            {"CidrIp": "0.0.0.0/0", "Description": "Allow all outbound traffic by default", "IpProtocol": "-1"}
        ]
    for rule in _rules(shipped, "AWS::EC2::SecurityGroupIngress"):
        assert rule.get("CidrIp") != "0.0.0.0/0"


def test_outbound_to_anywhere_is_https_only(shipped: Synth) -> None:
    for rule in _rules(shipped, "AWS::EC2::SecurityGroupEgress"):
        if rule.get("CidrIp") == "0.0.0.0/0":
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 443, 443)


def test_database_security_groups_admit_only_the_migration_groups_on_the_database_port(example: Synth) -> None:
    ingress = [
        r
        for r in _rules(example, "AWS::EC2::SecurityGroupIngress")
        if r["GroupId"] in ("sg-0a1b2c3d4e5f60aaa", "sg-0a1b2c3d4e5f60bbb")
    ]
    assert len(ingress) == 6  # functions, DMS, proxies x source, target
    for rule in ingress:
        assert (rule["FromPort"], rule["ToPort"]) == (5432, 5432)
        assert "SourceSecurityGroupId" in rule and "CidrIp" not in rule


def test_a_database_outside_the_vpc_range_is_reached_at_its_own_range(synth: Callable[..., Synth]) -> None:
    # Given a new VPC (10.82.0.0/16) and a source database reached through peering at 172.16.4.0/24
    network = {"vpc_cidr": "10.82.0.0/16", "availability_zones": ["eu-west-1a", "eu-west-1b"]}
    result = synth("migrations/debezium.yaml", aws={"network": {**network, "source_cidr": "172.16.4.0/24"}})
    inline = [e for g in _rules(result, "AWS::EC2::SecurityGroup") for e in g.get("SecurityGroupEgress", [])]
    egress = [r for r in inline + _rules(result, "AWS::EC2::SecurityGroupEgress") if r.get("FromPort") == 5432]
    to_source = [r for r in egress if r["Description"] == "the source database"]
    to_target = [r for r in egress if r["Description"] == "the target database"]
    # Then every group that talks to the source (functions, DMS, proxies, the Debezium connector) may reach
    # that range on its port, and none reaches the source at the VPC's range any more
    assert len(to_source) == 4
    assert {r["CidrIp"] for r in to_source} == {"172.16.4.0/24"}
    # And the target, given no range, is still reached at the VPC's
    assert len(to_target) == 3
    assert {r["CidrIp"] for r in to_target} == {"10.82.0.0/16"}
