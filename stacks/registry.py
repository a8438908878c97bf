"""The functions a migration deploys: one line each (pure data, so the rehearsal reads it
without loading CDK). stacks/orchestration.py builds a Lambda per spec and fills the state
machine's ${<name>FunctionArn} from it; rehearsal/run.py routes the same names to the
handlers in-process."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Access(StrEnum):
    """What a function may touch; each is granted on this migration's resources only."""

    DATABASES = "databases"  # read the source and target secrets; reach the databases' ports
    # whatever the configured engine needs: DATABASES, and DMS + METRICS_READ (dms) or CHANGE_STREAM (debezium)
    ENGINE = "engine"
    DMS = "dms"  # start, stop and describe this migration's DMS task(s)
    METRICS_READ = "metrics-read"  # read CloudWatch metrics (DMS CDC latency)
    ALARMS_READ = "alarms-read"  # read the state of this migration's alarms and the file's alarms (health gates)
    TRAFFIC = "traffic"  # change this migration's DNS records, retarget its proxies
    EXECUTIONS = "executions"  # list and stop this state machine's executions, start a rollback
    APPLY = "apply"  # engine debezium's applier: consume the table topics, write the target, dead letters
    # engine debezium: drive the connector and the applier's mappings, read the topics (the cutover waits
    # for, stops and retires the change stream); nothing for the other engines
    CHANGE_STREAM = "change-stream"
    VALIDATION_STORE = "validation-store"  # the bucket of validation plans' chunks and results
    # engine dms: the task's identity and its CDC latency metrics (how far DMS applied); nothing else
    DMS_LAG = "dms-lag"


@dataclass(frozen=True)
class HandlerSpec:
    name: str  # CamelCase; the ASL refers to the function as ${<name>FunctionArn}
    module: str  # lambdas/handlers/<module>.py with `handler(event, context)`
    access: tuple[Access, ...] = ()
    # event-source: Lambda event source mappings the replication function creates at run time
    invoked_by: Literal["state-machine", "alarm", "event-source"] = "state-machine"
    in_vpc: bool = True
    timeout_seconds: int = 300
    memory_mb: int = 512
    description: str = ""
    engines: tuple[str, ...] = ()  # deployed only for these engine types; () for every engine

    def applies_to(self, engine_type: str) -> bool:
        return not self.engines or engine_type in self.engines

    @property
    def handler(self) -> str:
        return f"lambdas.handlers.{self.module}.handler"

    @property
    def placeholder(self) -> str:
        return f"{self.name}FunctionArn"


HANDLERS: tuple[HandlerSpec, ...] = (
    HandlerSpec("Preflight", "preflight", (Access.DATABASES,), description="preflight checks of source and target"),
    HandlerSpec("Replication", "replication", (Access.ENGINE,), timeout_seconds=900, description="replication engine"),
    HandlerSpec(
        "ValidatePlan",
        "validate_plan",
        (Access.DATABASES, Access.VALIDATION_STORE),
        description="cuts tables into key ranges",
    ),
    HandlerSpec(
        "ValidateChunk",
        "validate_chunk",
        # re-checks wait until the engine caught up: debezium's applier, DMS's apply
        (Access.DATABASES, Access.CHANGE_STREAM, Access.DMS_LAG, Access.VALIDATION_STORE),
        # A re-check waits for the engine (dms: a marker row the task carries to the target):
        # validate_plan.engine_replication keeps the waits within this timeout.
        timeout_seconds=900,
        description="compares one key range",
    ),
    # Reads back every chunk's result (64 at a time) and folds them as they come (memory stays flat):
    # time is the limit. Folding runs at 10k-130k results/s (measured, 100 or no keys listed); S3 GETs
    # at ~20-30 ms each, 64 at once, give ~2-3k/s (not measured on AWS): 15 minutes for ~2M chunks.
    # 2 GB for the CPU share that comes with it.
    HandlerSpec(
        "ValidateSummary",
        "validate_summary",
        (Access.VALIDATION_STORE,),
        in_vpc=False,
        timeout_seconds=900,
        memory_mb=2048,
        description="merges chunk results",
    ),
    # REFRESH MATERIALIZED VIEW runs each view's query in full: as long as the view takes to compute.
    HandlerSpec(
        "RefreshViews",
        "refresh_views",
        (Access.DATABASES,),
        timeout_seconds=900,
        description="refreshes materialized views on the target before reads move",
    ),
    # the target database too: the step takes the migration's lock there and checks no rollback started since
    HandlerSpec(
        "ReadShift",
        "read_shift",
        (Access.TRAFFIC, Access.DATABASES),
        # a step waits up to a minute for the migration's lock, then for Route53's INSYNC
        # (router.route53.insync_timeout_seconds, up to ~800 s where the cutover's waits allow it)
        timeout_seconds=900,
        description="moves a share of reads to the target",
    ),
    HandlerSpec("HealthGate", "health_gate", (Access.ALARMS_READ, Access.ENGINE), description="alarms and lag say go"),
    HandlerSpec(
        "Cutover",
        "cutover",
        # ENGINE: the forward replication it waits for and stops (debezium's change stream, dms's task)
        (Access.DATABASES, Access.TRAFFIC, Access.ENGINE),
        timeout_seconds=900,
        description="fence, catch up, sequences, reverse replication, writer switch; and rollback",
    ),
    # Engine debezium: applies the change events of one table topic's batch (invoked by the event source
    # mappings of lambdas/core/changestream/msk_runtime.py; event source mappings allow at most 14 minutes).
    HandlerSpec(
        "ApplyChanges",
        "apply_changes",
        (Access.APPLY,),
        invoked_by="event-source",
        timeout_seconds=300,
        memory_mb=1024,
        engines=("debezium",),
        description="applies Debezium change events to the target",
    ),
    # Outside the VPC: the rollback must not depend on the VPC's egress; it calls Step Functions only.
    HandlerSpec(
        "Rollback",
        "rollback",
        (Access.EXECUTIONS,),
        invoked_by="alarm",
        in_vpc=False,
        timeout_seconds=60,
        description="stops the migration and starts its rollback when the composite alarm fires",
    ),
)
