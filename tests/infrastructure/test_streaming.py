"""Streaming construct: MSK Serverless with IAM by default; provisioned with TLS, KMS and SCRAM for DMS."""

from __future__ import annotations

from collections.abc import Callable

from aws_cdk.assertions import Match

from tests.infrastructure.conftest import Synth


def test_serverless_cluster_signs_in_with_iam_only(serverless: Synth) -> None:
    serverless.template.has_resource_properties(
        "AWS::MSK::ServerlessCluster",
        {
            "ClientAuthentication": {"Sasl": {"Iam": {"Enabled": True}}},
            "VpcConfigs": [Match.object_like({"SecurityGroups": Match.any_value()})],
        },
    )
    serverless.template.has_resource_properties(
        "AWS::MSK::Topic", {"TopicName": "zdm.shop-payments.changes", "PartitionCount": 12, "ReplicationFactor": 3}
    )


def test_serverless_is_the_default_cluster(synth: Callable[..., Synth]) -> None:
    result = synth("migrations/example.yaml", aws={"streaming": {"enabled": True}})
    result.template.resource_count_is("AWS::MSK::ServerlessCluster", 1)
    result.template.resource_count_is("AWS::MSK::Cluster", 0)


def test_provisioned_cluster_encrypts_in_transit_and_at_rest_and_refuses_anonymous_clients(example: Synth) -> None:
    example.template.has_resource_properties(
        "AWS::MSK::Cluster",
        {
            "NumberOfBrokerNodes": 3,
            "ClientAuthentication": {
                "Sasl": {"Iam": {"Enabled": True}, "Scram": {"Enabled": True}},
                "Unauthenticated": {"Enabled": False},
            },
            "EncryptionInfo": {
                "EncryptionAtRest": {
                    "DataVolumeKMSKeyId": {"Fn::GetAtt": [Match.string_like_regexp("SecurityDataKey"), "Arn"]}
                },
                "EncryptionInTransit": {"ClientBroker": "TLS", "InCluster": True},
            },
            "BrokerNodeGroupInfo": Match.object_like({"ConnectivityInfo": {"PublicAccess": {"Type": "DISABLED"}}}),
            "LoggingInfo": {"BrokerLogs": {"CloudWatchLogs": Match.object_like({"Enabled": True})}},
        },
    )
    example.template.has_resource_properties(
        "AWS::MSK::Configuration", {"ServerProperties": Match.string_like_regexp("auto.create.topics.enable=false")}
    )


def test_dms_scram_secret_is_generated_kms_encrypted_and_associated(example: Synth) -> None:
    example.template.has_resource_properties(
        "AWS::SecretsManager::Secret",
        {
            "Name": "AmazonMSK_zdm-shop-orders-dms",
            "KmsKeyId": {"Fn::GetAtt": [Match.string_like_regexp("SecurityDataKey"), "Arn"]},
            "GenerateSecretString": Match.object_like({"GenerateStringKey": "password", "PasswordLength": 32}),
        },
    )
    example.template.resource_count_is("AWS::MSK::BatchScramSecret", 1)


def test_no_streaming_no_cluster(synth: Callable[..., Synth]) -> None:
    result = synth("migrations/serverless-proxy.yaml", aws={"streaming": {"enabled": False}})
    for kind in ("AWS::MSK::ServerlessCluster", "AWS::MSK::Cluster", "AWS::MSK::Topic"):
        result.template.resource_count_is(kind, 0)
