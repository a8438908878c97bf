"""Health of the migration: alarms, one composite alarm over them, the EventBridge rule that
invokes the rollback function when the composite enters ALARM, and a dashboard.

Alarms (each named zdm-<name>-<what>; any of them in ALARM rolls the migration back):
- DMS CDCLatencySource / CDCLatencyTarget above `alarms.max_lag_seconds` (engine dms)
- DMS task failure (DMS failure events, counted) and DMS task errors (error lines in the task log)
- the published ReplicationLagSeconds above `alarms.max_lag_seconds`; ReplicationFailed
- slot health: SlotRetainedWalBytes above `alarms.max_retained_wal`, SlotLost, and for an RDS
  instance source RDS's own OldestReplicationSlotLag
- target database errors: ERROR/FATAL/PANIC lines in the target's PostgreSQL log
  (needs the target's rds_*_identifier and PostgreSQL log export to CloudWatch Logs)
- the application's error rate (`alarms.error_rate_metric`), and every alarm in `alarms.names`
- engine debezium: the applier's DeadLetters (events it could not apply) and any message in the
  change stream's dead-letter queue (a batch the event source mapping gave up on): either means
  the target misses a change
"""

from __future__ import annotations

from collections.abc import Sequence

import aws_cdk as cdk
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from lambdas.core import telemetry
from lambdas.core.telemetry import alarm_name_prefix, composite_alarm_name
from stacks.change_stream import ChangeStream
from stacks.common import MigrationContext
from stacks.replication import Replication

MINUTE = cdk.Duration.minutes(1)


class Monitoring(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        ctx: MigrationContext,
        replication: Replication | None,
        rollback: Sequence[lambda_.IFunction],
        dead_letters: sqs.IQueue,
        change_stream: ChangeStream | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self._ctx = ctx
        m = ctx.migration
        a = m.alarms
        self._prefix = alarm_name_prefix(ctx.name)
        self.alarms: list[cloudwatch.IAlarm] = []
        dims = telemetry.dimensions(ctx.name)

        def custom(name: str, statistic: str = "Maximum") -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace=telemetry.NAMESPACE, metric_name=name, dimensions_map=dims, statistic=statistic, period=MINUTE
            )

        def filtered(name: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace=telemetry.filter_namespace(ctx.name), metric_name=name, statistic="Sum", period=MINUTE
            )

        # -- replication lag and failure -------------------------------------------------------
        self.lag_metrics: list[cloudwatch.IMetric] = [custom(telemetry.REPLICATION_LAG_SECONDS)]
        self._alarm(
            "ReplicationLag",
            custom(telemetry.REPLICATION_LAG_SECONDS),
            a.max_lag_seconds,
            "replication lag (published by the replication status task) above alarms.max_lag_seconds",
        )
        self._alarm(
            "ReplicationFailed",
            custom(telemetry.REPLICATION_FAILED),
            1,
            "the replication engine reports phase 'failed'",
            minutes=1,
            op=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
        )
        primary = replication.primary if replication else None
        if primary is not None:
            for metric_name in ("CDCLatencySource", "CDCLatencyTarget"):
                metric = cloudwatch.Metric(
                    namespace="AWS/DMS",
                    metric_name=metric_name,
                    dimensions_map=primary.target.metric_dimensions,
                    statistic="Maximum",
                    period=MINUTE,
                )
                self.lag_metrics.append(metric)
                self._alarm(
                    f"Dms{metric_name}", metric, a.max_lag_seconds, f"DMS {metric_name} above alarms.max_lag_seconds"
                )
        if replication is not None and replication.tasks:
            self._alarm(
                "DmsTaskFailed",
                filtered(telemetry.DMS_TASK_FAILURES),
                1,
                "a DMS task of the migration failed (DMS failure event)",
                minutes=1,
                op=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            )
            self._alarm(
                "DmsTaskErrors",
                filtered(telemetry.DMS_TASK_ERRORS),
                a.target_errors_per_minute,
                "error lines in the DMS task logs above alarms.target_errors_per_minute",
                op=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            )

        # -- the change stream (engine debezium) -----------------------------------------------------
        if change_stream is not None:
            dead = custom(telemetry.DEAD_LETTERS, "Sum")
            self._alarm(
                "ChangeStreamDeadLetters",
                dead,
                1,
                "the change-stream applier sent events it could not apply to the dead-letter queue",
                minutes=1,
                op=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            )
            queued = change_stream.dead_letters.metric_approximate_number_of_messages_visible(
                statistic="Maximum", period=MINUTE
            )
            self._alarm(
                "ChangeStreamFailedBatches",
                queued,
                1,
                "messages in the change stream's dead-letter queue (failed applier batches or dead letters)",
                minutes=1,
                op=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            )
            self.change_stream_metrics: list[cloudwatch.IMetric] = [dead, queued]
        else:
            self.change_stream_metrics = []

        # -- slot health -------------------------------------------------------------------------
        self.slot_metrics: list[cloudwatch.IMetric] = [
            custom(telemetry.SLOT_RETAINED_WAL_BYTES),
            custom(telemetry.REPLICATION_LAG_BYTES),
        ]
        self._alarm(
            "SlotRetainedWal",
            custom(telemetry.SLOT_RETAINED_WAL_BYTES),
            a.max_retained_wal,
            "WAL kept by the replication slot on the source above alarms.max_retained_wal",
        )
        self._alarm(
            "SlotLost",
            custom(telemetry.SLOT_LOST),
            1,
            "the replication slot on the source is lost or missing",
            minutes=1,
            op=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
        )
        if m.source.rds_instance_identifier:
            rds_slot = cloudwatch.Metric(
                namespace="AWS/RDS",
                metric_name="OldestReplicationSlotLag",
                dimensions_map={"DBInstanceIdentifier": m.source.rds_instance_identifier},
                statistic="Maximum",
                period=MINUTE,
            )
            self.slot_metrics.append(rds_slot)
            self._alarm(
                "SourceSlotLag",
                rds_slot,
                a.max_retained_wal,
                "RDS OldestReplicationSlotLag on the source above alarms.max_retained_wal",
            )

        # -- the target database's errors ----------------------------------------------------------
        self.error_metrics: list[cloudwatch.IMetric] = []
        target_log = None
        if m.target.rds_cluster_identifier:
            target_log = f"/aws/rds/cluster/{m.target.rds_cluster_identifier}/postgresql"
        elif m.target.rds_instance_identifier:
            target_log = f"/aws/rds/instance/{m.target.rds_instance_identifier}/postgresql"
        if target_log:
            # RDS creates this group when PostgreSQL log export is on (a prerequisite on the target).
            logs.CfnMetricFilter(
                self,
                "TargetDatabaseErrorsFilter",
                log_group_name=target_log,
                filter_pattern='?"ERROR:" ?"FATAL:" ?"PANIC:"',
                metric_transformations=[
                    logs.CfnMetricFilter.MetricTransformationProperty(
                        metric_namespace=telemetry.filter_namespace(ctx.name),
                        metric_name=telemetry.TARGET_DATABASE_ERRORS,
                        metric_value="1",
                        default_value=0,
                    )
                ],
            )
            errors = filtered(telemetry.TARGET_DATABASE_ERRORS)
            self.error_metrics.append(errors)
            self._alarm(
                "TargetDatabaseErrors",
                errors,
                a.target_errors_per_minute,
                "ERROR/FATAL/PANIC lines a minute in the target's PostgreSQL log",
                op=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            )

        # -- the application ---------------------------------------------------------------------
        if a.error_rate_metric:
            namespace, _, metric_name = a.error_rate_metric.rpartition("/")
            app = cloudwatch.Metric(
                namespace=namespace,
                metric_name=metric_name,
                dimensions_map=a.error_rate_dimensions or None,
                statistic=a.error_rate_statistic,
                period=MINUTE,
            )
            self.error_metrics.append(app)
            self._alarm(
                "AppErrorRate", app, a.error_rate_threshold, f"{a.error_rate_metric} above alarms.error_rate_threshold"
            )
        for index, name in enumerate(a.names):
            self.alarms.append(cloudwatch.Alarm.from_alarm_name(self, f"FileAlarm{index}", name))

        # -- the rollback window: outside the composite, since what they report is that a rollback would be
        # refused (the back replication is broken) or would hold writes long: a person mends it, nothing rolls back
        self.window_alarms: list[cloudwatch.IAlarm] = [
            self._alarm(
                "RollbackNotReady",
                custom(telemetry.ROLLBACK_READY, "Minimum"),
                1,
                "in the rollback window, the reverse replication has been broken for lag.problems_max_seconds: a "
                "rollback would be refused (see the execution's rollback_problems)",
                minutes=1,
                op=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
                in_composite=False,
            ),
            self._alarm(
                "ReverseSlotRetainedWal",
                custom(telemetry.REVERSE_SLOT_RETAINED_WAL_BYTES),
                a.max_retained_wal,
                "WAL kept on the target by the reverse replication's slot above alarms.max_retained_wal",
                in_composite=False,
            ),
        ]

        # -- composite, and the rule that rolls back ----------------------------------------------
        self.composite = cloudwatch.CompositeAlarm(
            self,
            "Health",
            composite_alarm_name=composite_alarm_name(ctx.name),
            alarm_description=f"zdm {ctx.name}: any alarm of the migration in ALARM; EventBridge rolls the migration back",
            alarm_rule=cloudwatch.AlarmRule.any_of(
                *(cloudwatch.AlarmRule.from_alarm(alarm, cloudwatch.AlarmState.ALARM) for alarm in self.alarms)
            ),
        )
        self.rule = events.Rule(
            self,
            "RollbackOnAlarm",
            description=f"zdm {ctx.name}: the composite health alarm entered ALARM: roll back",
            event_pattern=events.EventPattern(
                source=["aws.cloudwatch"],
                detail_type=["CloudWatch Alarm State Change"],
                resources=[self.composite.alarm_arn],
                detail={"state": {"value": ["ALARM"]}},
            ),
        )
        for function in rollback:
            self.rule.add_target(
                targets.LambdaFunction(
                    function, dead_letter_queue=dead_letters, retry_attempts=4, max_event_age=cdk.Duration.hours(1)
                )
            )
        self.dashboard = self._dashboard()

    def _alarm(
        self,
        construct_id: str,
        metric: cloudwatch.IMetric,
        threshold: float,
        what: str,
        *,
        minutes: int | None = None,
        op: cloudwatch.ComparisonOperator = cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        in_composite: bool = True,
    ) -> cloudwatch.Alarm:
        evaluation = minutes or self._ctx.migration.alarms.evaluation_minutes
        kebab = "".join(f"-{c.lower()}" if c.isupper() else c for c in construct_id).lstrip("-")
        alarm = cloudwatch.Alarm(
            self,
            construct_id,
            alarm_name=f"{self._prefix}{kebab}",
            alarm_description=f"zdm {self._ctx.name}: {what}",
            metric=metric,
            threshold=threshold,
            comparison_operator=op,
            evaluation_periods=evaluation,
            datapoints_to_alarm=evaluation,
            # No data means nothing to judge (engine not running, metric not published yet): not a breach.
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        if in_composite:
            self.alarms.append(alarm)
        return alarm

    def _dashboard(self) -> cloudwatch.Dashboard:
        ctx = self._ctx
        dims = telemetry.dimensions(ctx.name)

        def custom(name: str, statistic: str = "Maximum") -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace=telemetry.NAMESPACE, metric_name=name, dimensions_map=dims, statistic=statistic, period=MINUTE
            )

        dashboard = cloudwatch.Dashboard(
            self, "Dashboard", dashboard_name=f"zdm-{ctx.name}", default_interval=cdk.Duration.hours(6)
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(title="Replication lag (seconds)", left=self.lag_metrics, width=12),
            cloudwatch.GraphWidget(title="Lag and retained WAL (bytes)", left=self.slot_metrics, width=12),
        )
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Traffic: reads on the target (%), writer on the target (1)",
                left=[custom(telemetry.READ_WEIGHT_TARGET_PERCENT)],
                right=[custom(telemetry.WRITER_ON_TARGET)],
                width=12,
            ),
            cloudwatch.GraphWidget(
                title="Progress: tables ready (%), validation chunks, mismatched rows",
                left=[custom(telemetry.TABLES_READY_PERCENT)],
                right=[
                    custom(telemetry.VALIDATION_CHUNKS_DONE),
                    custom(telemetry.VALIDATION_CHUNKS_TOTAL),
                    custom(telemetry.VALIDATION_MISMATCHED_ROWS, "Sum"),
                ],
                width=12,
            ),
        )
        dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(
                title="Alarms (any in ALARM rolls back)", alarms=[self.composite, *self.alarms], width=12
            ),
            cloudwatch.AlarmStatusWidget(
                title="Rollback window (a person acts: nothing rolls back)", alarms=self.window_alarms, width=12
            ),
            cloudwatch.GraphWidget(
                title="Errors: target database, application",
                left=[*self.error_metrics, *self.change_stream_metrics] or [custom(telemetry.REPLICATION_FAILED)],
                width=12,
            ),
        )
        return dashboard
