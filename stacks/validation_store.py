"""The bucket that holds validation plans' chunk lists and the chunks' results.

The Distributed Map reads a plan's chunks from here (ItemReader) and writes its own run output here
(ResultWriter); the chunk tasks store their results and the summary task reads them back
(lambdas/core/validation/store.py), so no state carries more than a few kilobytes whatever the
table's size. Results name differing rows by key: the bucket is encrypted with the migration's data
key, private, TLS only, and kept after the stack is deleted with the logs' retention (evidence that
the data was proven equal), objects expiring after it.
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from stacks.common import MigrationContext, acknowledge, acknowledge_resource

PREFIX = "validation/"  # lambdas/core/validation/store.plan_prefix
BUCKET_ENV = "ZDM_VALIDATION_BUCKET"  # lambdas/handlers/runtime.VALIDATION_BUCKET_ENV


class ValidationStore(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, ctx: MigrationContext) -> None:
        super().__init__(scope, construct_id)
        self._ctx = ctx
        self.bucket = s3.Bucket(
            self,
            "Bucket",
            encryption=s3.BucketEncryption.KMS,
            encryption_key=ctx.keys.data,
            bucket_key_enabled=True,
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[
                s3.LifecycleRule(
                    expiration=cdk.Duration.days(ctx.migration.aws.log_retention_days),
                    abort_incomplete_multipart_upload_after=cdk.Duration.days(1),
                )
            ],
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        acknowledge(
            self.bucket,
            "AwsSolutions-S1",
            "Written and read only by this migration's validation functions and state machine (their roles"
            " are the only grants); their calls are traced and logged. Server access logs would need a"
            " second bucket per migration for no added evidence.",
        )
        self.objects = self.bucket.arn_for_objects(f"{PREFIX}*")

    def grant_functions(self, function: cdk.aws_lambda.Function, role: iam.Role) -> None:
        """Store and read chunk lists and results; list a plan's results (the summary)."""
        function.add_environment(BUCKET_ENV, self.bucket.bucket_name)
        role.add_to_policy(iam.PolicyStatement(actions=["s3:GetObject", "s3:PutObject"], resources=[self.objects]))
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["s3:ListBucket"],
                resources=[self.bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [f"{PREFIX}*"]}},
            )
        )
        self._grant_key(role)
        acknowledge_resource(role, self.objects, self._objects_reason)

    def grant_state_machine(self, role: iam.Role) -> None:
        """The Distributed Map's ItemReader (GetObject) and ResultWriter (PutObject, multipart uploads)."""
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["s3:GetObject", "s3:PutObject", "s3:ListMultipartUploadParts", "s3:AbortMultipartUpload"],
                resources=[self.objects],
            )
        )
        self._grant_key(role)
        acknowledge_resource(role, self.objects, self._objects_reason)

    def _grant_key(self, role: iam.Role) -> None:
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=[self._ctx.keys.data.key_arn],
                conditions={"StringEquals": {"kms:ViaService": f"s3.{self._ctx.env.region}.amazonaws.com"}},
            )
        )

    _objects_reason = (
        "The objects under validation/ of this migration's own bucket: one per plan and per chunk result,"
        " named at run time (execution name, plan id, table, chunk)."
    )
