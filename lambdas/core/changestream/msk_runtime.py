"""The change stream on AWS: the Debezium connector on MSK Connect, the applier Lambda fed by one
MSK event source mapping per table topic.

The stack (stacks/change_stream.py) creates everything that does not depend on the tables: the
custom plugin, the worker configuration, the connector's service execution role and security
group, its log group, the applier function and the dead-letter queue. It hands their ids to the
replication function as JSON in `ZDM_CHANGE_STREAM` (`MskChangeStreamSettings`). This runtime
creates, pauses, resumes and deletes the parts that do: the connector (its configuration names
the tables) and the event source mappings (one per table topic). Both clients are passed in, so
tests give botocore Stubbers.

- The connector signs in to MSK with IAM over TLS. Its database credentials are references to the
  source's Secrets Manager secret (`secret_reference`), resolved by the MSK config provider in the
  worker configuration: the connector configuration (visible to DescribeConnector and CloudTrail)
  never holds the password.
- The table topics must exist before their mappings: `ensure_topics` (the engine's Kafka admin,
  e.g. `KafkaStream.ensure_topics`) creates them first when given; the connector also creates a
  topic on its first write (`topic.creation.default.*` in `connector_defaults`), but a table
  without rows gets no topic until its first change.
- Every table topic gets its own consumer group (`<consumer_group_prefix>.<topic>`): Lambda requires
  a group id unique among all Kafka event sources.
- `stop()` pauses both (MSK Connect's PauseConnector keeps the connector's offsets; a disabled
  mapping keeps its consumer group's offsets), so `start()` resumes where they stood. A paused
  connector does not read its slot: the source keeps WAL for it until it is resumed or torn down.
- A part being created, changed or deleted raises `ChangeStreamBusy` (retry later); a failed
  connector raises `ChangeStreamFailed` from `start()` with MSK Connect's reason.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

from lambdas.core.changestream.runtime import ChangeStreamRuntime, PartState, RuntimeHealth

# The replication function's environment variable holding MskChangeStreamSettings as JSON (set by the stack).
CHANGE_STREAM_ENV = "ZDM_CHANGE_STREAM"
BACKEND = "msk"
# The worker configuration's name for the Secrets Manager config provider (stacks/change_stream.py).
SECRETS_PROVIDER = "secretsmanager"
_GROUP_ID_LIMIT = 200  # Lambda: AmazonManagedKafkaEventSourceConfig.ConsumerGroupId is 1-200 characters


class ChangeStreamBusy(RuntimeError):
    """A connector or mapping is being created, changed or deleted: call again later."""


class ChangeStreamFailed(RuntimeError):
    """The connector failed; MSK Connect's reason is in the message."""


class KafkaConnectClient(Protocol):
    """The MSK Connect calls the runtime makes (a boto3 'kafkaconnect' client satisfies it)."""

    def list_connectors(self, **kwargs: Any) -> dict[str, Any]: ...
    def describe_connector(self, **kwargs: Any) -> dict[str, Any]: ...
    def create_connector(self, **kwargs: Any) -> dict[str, Any]: ...
    def pause_connector(self, **kwargs: Any) -> dict[str, Any]: ...
    def resume_connector(self, **kwargs: Any) -> dict[str, Any]: ...
    def delete_connector(self, **kwargs: Any) -> dict[str, Any]: ...


class LambdaClient(Protocol):
    """The Lambda event source mapping calls the runtime makes (a boto3 'lambda' client satisfies it)."""

    def list_event_source_mappings(self, **kwargs: Any) -> dict[str, Any]: ...
    def create_event_source_mapping(self, **kwargs: Any) -> dict[str, Any]: ...
    def update_event_source_mapping(self, **kwargs: Any) -> dict[str, Any]: ...
    def delete_event_source_mapping(self, **kwargs: Any) -> dict[str, Any]: ...


def secret_reference(secret_arn: str, key: str, provider: str = SECRETS_PROVIDER) -> str:
    """A config-provider reference to one key of a Secrets Manager secret, resolved by the workers.

    Kafka's reference syntax is `${provider:path:key}`; an ARN holds ':', so the MSK config provider
    takes it URL-encoded (it decodes the path before calling Secrets Manager).
    """
    return f"${{{provider}:{quote(secret_arn, safe='')}:{key}}}"


@dataclass(frozen=True)
class MskChangeStreamSettings:
    """What the stack created for the change stream (JSON in ZDM_CHANGE_STREAM)."""

    connector_name: str
    cluster_arn: str
    bootstrap_servers: str  # MSK's IAM bootstrap string (port 9098)
    custom_plugin_arn: str
    custom_plugin_revision: int
    worker_configuration_arn: str
    worker_configuration_revision: int
    service_execution_role_arn: str
    subnets: list[str]
    security_groups: list[str]
    log_group: str
    applier_function: str  # the applier's name or ARN
    dead_letter_queue_arn: str  # on-failure destination of every mapping (and the applier's own dead letters)
    consumer_group_prefix: str
    kafka_connect_version: str = "3.7.x"
    mcu_count: int = 1
    workers: int = 1
    batch_size: int = 2000
    batch_window_seconds: int = 1
    maximum_retry_attempts: int = 3
    source_secret_arn: str | None = None
    dead_letter_queue_url: str | None = None
    # Defaults the runtime adds under the connector settings it is given (those win): topic creation
    # (the brokers create no topic implicitly), TLS to the database, no restart on every provider lookup.
    connector_defaults: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> MskChangeStreamSettings:
        data = json.loads(text)
        backend = data.pop("backend", BACKEND)
        if backend != BACKEND:
            raise ValueError(f"{CHANGE_STREAM_ENV} describes backend {backend!r}; this runtime is {BACKEND!r}")
        ints = (
            "custom_plugin_revision",
            "worker_configuration_revision",
            "mcu_count",
            "workers",
            "batch_size",
            "batch_window_seconds",
            "maximum_retry_attempts",
        )
        for name in ints:  # CloudFormation renders revisions from GetAtt as text
            if name in data:
                data[name] = int(data[name])
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{CHANGE_STREAM_ENV} has unknown keys {unknown}; known: {sorted(known)}")
        data["subnets"] = list(data.get("subnets", []))
        data["security_groups"] = list(data.get("security_groups", []))
        data["connector_defaults"] = {str(k): str(v) for k, v in dict(data.get("connector_defaults", {})).items()}
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps({"backend": BACKEND, **asdict(self)}, sort_keys=True)

    def consumer_group(self, topic: str) -> str:
        """The mapping's consumer group: unique per topic (Lambda refuses a group two Kafka sources share)."""
        group = f"{self.consumer_group_prefix}.{topic}"
        if len(group) <= _GROUP_ID_LIMIT:
            return group
        digest = hashlib.sha256(group.encode()).hexdigest()[:12]
        return f"{group[: _GROUP_ID_LIMIT - 13]}-{digest}"

    def credentials(self) -> tuple[str, str]:
        """The connector's database user and password as config-provider references to the source secret."""
        if self.source_secret_arn is None:
            raise ValueError(f"{CHANGE_STREAM_ENV} has no source_secret_arn: redeploy the stack")
        return secret_reference(self.source_secret_arn, "username"), secret_reference(
            self.source_secret_arn, "password"
        )


# MSK Connect connector states -> PartState.
_CONNECTOR_STATES = {
    "CREATING": PartState.STARTING,
    "UPDATING": PartState.STARTING,
    "RESUMING": PartState.STARTING,
    "RESTARTING": PartState.STARTING,
    "RUNNING": PartState.RUNNING,
    "PAUSING": PartState.PAUSED,
    "PAUSED": PartState.PAUSED,
    "FAILED": PartState.FAILED,
    "DELETING": PartState.ABSENT,
}

# Lambda event source mapping states -> PartState.
_MAPPING_STATES = {
    "Creating": PartState.STARTING,
    "Enabling": PartState.STARTING,
    "Updating": PartState.STARTING,
    "Enabled": PartState.RUNNING,
    "Disabling": PartState.PAUSED,
    "Disabled": PartState.PAUSED,
    "Deleting": PartState.ABSENT,
}
# Worst first: the applier is as healthy as its least healthy mapping.
_SEVERITY = (PartState.FAILED, PartState.STARTING, PartState.PAUSED, PartState.RUNNING)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


@dataclass(frozen=True)
class _Connector:
    arn: str
    state: str


@dataclass(frozen=True)
class _Mapping:
    uuid: str
    topic: str
    state: str
    last_result: str
    transition_reason: str

    @property
    def problem(self) -> str | None:
        """Lambda reports broker, network and permission problems in LastProcessingResult ('PROBLEM: ...')."""
        if self.last_result.upper().startswith("PROBLEM"):
            return self.last_result
        return None


class MskChangeStream(ChangeStreamRuntime):
    def __init__(
        self,
        kafkaconnect: KafkaConnectClient,
        lambda_client: LambdaClient,
        settings: MskChangeStreamSettings,
        ensure_topics: Callable[[Sequence[str]], object] | None = None,
    ) -> None:
        self._connect = kafkaconnect
        self._lambda = lambda_client
        self.settings = settings
        self._ensure_topics = ensure_topics

    # -- lookups -------------------------------------------------------------------------------
    def _connector(self) -> _Connector | None:
        name = self.settings.connector_name
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"connectorNamePrefix": name}
            if token:
                kwargs["nextToken"] = token
            page = self._connect.list_connectors(**kwargs)
            for summary in page.get("connectors", []):
                if summary.get("connectorName") == name:  # a prefix also matches longer names
                    return _Connector(summary["connectorArn"], str(summary.get("connectorState", "")))
            token = page.get("nextToken")
            if not token:
                return None

    def _mappings(self) -> Iterator[_Mapping]:
        """The applier's mappings on this cluster (one per topic)."""
        marker: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "EventSourceArn": self.settings.cluster_arn,
                "FunctionName": self.settings.applier_function,
            }
            if marker:
                kwargs["Marker"] = marker
            page = self._lambda.list_event_source_mappings(**kwargs)
            for mapping in page.get("EventSourceMappings", []):
                for topic in mapping.get("Topics", []):
                    yield _Mapping(
                        uuid=mapping["UUID"],
                        topic=topic,
                        state=str(mapping.get("State", "")),
                        last_result=str(mapping.get("LastProcessingResult", "")),
                        transition_reason=str(mapping.get("StateTransitionReason", "")),
                    )
            marker = page.get("NextMarker")
            if not marker:
                return

    def _by_topic(self) -> dict[str, _Mapping]:
        return {m.topic: m for m in self._mappings()}

    # -- ChangeStreamRuntime ---------------------------------------------------------------------
    def start(self, connector: Mapping[str, str], topics: Sequence[str]) -> None:
        # The applier first: its mappings read from the start of each topic (TRIM_HORIZON), so nothing
        # the connector writes meanwhile is missed, and a snapshot never waits for a consumer.
        if self._ensure_topics is not None:
            self._ensure_topics(list(dict.fromkeys(topics)))
        existing = self._by_topic()
        for topic in dict.fromkeys(topics):
            mapping = existing.get(topic)
            if mapping is None:
                self._create_mapping(topic)
            elif mapping.state == "Disabled":
                self._update_mapping(mapping.uuid, enabled=True)
            elif mapping.state in ("Disabling", "Deleting"):
                raise ChangeStreamBusy(f"the mapping of topic {topic} is {mapping.state.lower()}; start again later")
        found = self._connector()
        if found is None:
            self._create_connector(connector)
        elif found.state == "PAUSED":
            self._resume(found.arn)
        elif found.state == "FAILED":
            raise ChangeStreamFailed(f"connector {self.settings.connector_name} failed: {self._reason(found.arn)}")
        elif found.state in ("DELETING", "PAUSING"):
            raise ChangeStreamBusy(
                f"connector {self.settings.connector_name} is {found.state.lower()}; start again later"
            )

    def health(self) -> RuntimeHealth:
        problems: list[str] = []
        found = self._connector()
        if found is None:
            connector_state = PartState.ABSENT
        else:
            connector_state = _CONNECTOR_STATES.get(found.state, PartState.STARTING)
            if connector_state is PartState.FAILED:
                problems.append(f"connector {self.settings.connector_name} failed: {self._reason(found.arn)}")
            elif found.state == "DELETING":
                problems.append(f"connector {self.settings.connector_name} is being deleted")
        applier_state = PartState.ABSENT
        mappings = list(self._mappings())
        if mappings:
            states = []
            for mapping in mappings:
                state = _MAPPING_STATES.get(mapping.state, PartState.STARTING)
                if mapping.problem is not None:
                    state = PartState.FAILED
                    problems.append(f"mapping of topic {mapping.topic}: {mapping.problem}")
                states.append(state)
            present = [s for s in states if s is not PartState.ABSENT]
            applier_state = next((s for s in _SEVERITY if s in present), PartState.ABSENT)
        return RuntimeHealth(connector=connector_state, applier=applier_state, problems=problems)

    def stop(self) -> None:
        for mapping in self._mappings():
            if mapping.state in ("Enabled", "Enabling", "Creating", "Updating"):
                if mapping.state != "Enabled":
                    raise ChangeStreamBusy(
                        f"the mapping of topic {mapping.topic} is {mapping.state.lower()}; stop again later"
                    )
                self._update_mapping(mapping.uuid, enabled=False)
        found = self._connector()
        if found is None or found.state in ("PAUSED", "PAUSING", "FAILED", "DELETING"):
            return  # nothing reads the slot (a failed connector cannot be paused: it is not running)
        if found.state != "RUNNING":
            raise ChangeStreamBusy(
                f"connector {self.settings.connector_name} is {found.state.lower()}; stop again later"
            )
        try:
            self._connect.pause_connector(connectorArn=found.arn)
        except Exception as exc:
            if _error_code(exc) == "ConflictException":  # another lifecycle operation is running
                raise ChangeStreamBusy(f"connector {self.settings.connector_name}: {exc}") from exc
            raise

    def teardown(self) -> list[str]:
        removed: list[str] = []
        for mapping in self._mappings():
            if mapping.state == "Deleting":
                continue
            try:
                self._lambda.delete_event_source_mapping(UUID=mapping.uuid)
            except Exception as exc:
                code = _error_code(exc)
                if code == "ResourceNotFoundException":
                    continue
                if code == "ResourceInUseException":
                    raise ChangeStreamBusy(f"the mapping of topic {mapping.topic}: {exc}") from exc
                raise
            removed.append(f"event source mapping {mapping.topic} -> {self.settings.applier_function}")
        found = self._connector()
        if found is not None and found.state != "DELETING":
            try:
                self._connect.delete_connector(connectorArn=found.arn)
            except Exception as exc:
                code = _error_code(exc)
                if code == "NotFoundException":
                    return removed
                if code == "ConflictException":
                    raise ChangeStreamBusy(f"connector {self.settings.connector_name}: {exc}") from exc
                raise
            removed.append(f"connector {self.settings.connector_name}")
        return removed

    # -- calls ---------------------------------------------------------------------------------
    def configuration(self, connector: Mapping[str, str]) -> dict[str, str]:
        """The connector configuration sent to MSK Connect: the stack's defaults under the given settings."""
        return {**self.settings.connector_defaults, **{str(k): str(v) for k, v in connector.items()}}

    def _create_connector(self, connector: Mapping[str, str]) -> None:
        s = self.settings
        try:
            self._connect.create_connector(
                connectorName=s.connector_name,
                connectorDescription=f"zdm: Debezium PostgreSQL change stream ({s.connector_name})",
                kafkaConnectVersion=s.kafka_connect_version,
                capacity={"provisionedCapacity": {"mcuCount": s.mcu_count, "workerCount": s.workers}},
                connectorConfiguration=self.configuration(connector),
                kafkaCluster={
                    "apacheKafkaCluster": {
                        "bootstrapServers": s.bootstrap_servers,
                        "vpc": {"subnets": list(s.subnets), "securityGroups": list(s.security_groups)},
                    }
                },
                kafkaClusterClientAuthentication={"authenticationType": "IAM"},
                kafkaClusterEncryptionInTransit={"encryptionType": "TLS"},
                plugins=[
                    {"customPlugin": {"customPluginArn": s.custom_plugin_arn, "revision": s.custom_plugin_revision}}
                ],
                serviceExecutionRoleArn=s.service_execution_role_arn,
                workerConfiguration={
                    "workerConfigurationArn": s.worker_configuration_arn,
                    "revision": s.worker_configuration_revision,
                },
                logDelivery={"workerLogDelivery": {"cloudWatchLogs": {"enabled": True, "logGroup": s.log_group}}},
            )
        except Exception as exc:
            if _error_code(exc) == "ConflictException":  # created meanwhile (a retried start)
                return
            raise

    def _resume(self, arn: str) -> None:
        try:
            self._connect.resume_connector(connectorArn=arn)
        except Exception as exc:
            if _error_code(exc) == "ConflictException":
                raise ChangeStreamBusy(f"connector {self.settings.connector_name}: {exc}") from exc
            raise

    def _reason(self, arn: str) -> str:
        described = self._connect.describe_connector(connectorArn=arn)
        state = described.get("stateDescription") or {}
        code, message = state.get("code"), state.get("message")
        return ": ".join(str(p) for p in (code, message) if p) or "no reason given"

    def _create_mapping(self, topic: str) -> None:
        s = self.settings
        try:
            self._lambda.create_event_source_mapping(
                EventSourceArn=s.cluster_arn,
                FunctionName=s.applier_function,
                Topics=[topic],
                StartingPosition="TRIM_HORIZON",
                BatchSize=s.batch_size,
                MaximumBatchingWindowInSeconds=s.batch_window_seconds,
                MaximumRetryAttempts=s.maximum_retry_attempts,
                DestinationConfig={"OnFailure": {"Destination": s.dead_letter_queue_arn}},
                AmazonManagedKafkaEventSourceConfig={"ConsumerGroupId": s.consumer_group(topic)},
                Enabled=True,
            )
        except Exception as exc:
            if _error_code(exc) == "ResourceConflictException":  # created meanwhile (a retried start)
                return
            raise

    def _update_mapping(self, uuid: str, *, enabled: bool) -> None:
        try:
            self._lambda.update_event_source_mapping(UUID=uuid, Enabled=enabled)
        except Exception as exc:
            if _error_code(exc) == "ResourceInUseException":
                raise ChangeStreamBusy(f"event source mapping {uuid}: {exc}") from exc
            raise
