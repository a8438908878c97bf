"""Where application traffic goes: an RDS Proxy in front of the source and one in front of the
target (TLS required, credentials from the endpoints' secrets), and private DNS records the
routers move: the writer record, and weighted reader records across both proxies.

Names: with `router.type: rds-proxy` the source proxy is `router.rds_proxy.proxy_name` (the
application's endpoint; the router retargets it to the target database at cutover) and the
target proxy is `<proxy_name>-target`; otherwise `zdm-<name>-source` and `zdm-<name>-target`.
The zone is `router.route53.hosted_zone_id` when given, otherwise a new private zone
`router.route53.zone_name` in the migration's VPC. TTLs come from `router.route53.ttl_seconds`.
"""

from __future__ import annotations

from dataclasses import dataclass

import aws_cdk as cdk
from aws_cdk import aws_kms as kms
from aws_cdk import aws_rds as rds
from aws_cdk import aws_route53 as route53
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from lambdas.core.config import Endpoint
from stacks.common import MigrationContext, short_name
from stacks.network import Network


@dataclass(frozen=True)
class ProxySide:
    side: str
    proxy: rds.DatabaseProxy | None
    database_arns: list[str]  # the RDS cluster or instance the proxy fronts (retargeting needs them)


class Traffic(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, ctx: MigrationContext, network: Network) -> None:
        super().__init__(scope, construct_id)
        m = ctx.migration
        self._ctx = ctx
        if m.router.type == "rds-proxy" and m.router.rds_proxy.proxy_name:
            names = {"source": m.router.rds_proxy.proxy_name, "target": f"{m.router.rds_proxy.proxy_name}-target"}
        else:
            names = {
                "source": short_name("zdm", m.name, "source", limit=60),
                "target": short_name("zdm", m.name, "target", limit=60),
            }
        self.sides = {
            side: self._proxy(side.capitalize(), side, names[side], getattr(m, side), network)
            for side in ("source", "target")
        }
        self.proxy_names = names

        settings = m.router.route53
        if settings.hosted_zone_id is not None:
            self.zone: route53.IHostedZone = route53.HostedZone.from_hosted_zone_attributes(
                self, "Zone", hosted_zone_id=settings.hosted_zone_id, zone_name=settings.zone_name
            )
        else:
            self.zone = route53.PrivateHostedZone(
                self, "Zone", zone_name=settings.zone_name, vpc=network.vpc, comment=f"zdm {m.name}: database names"
            )
        self.writer_name = f"{settings.writer_record}.{settings.zone_name}"
        self.reader_name = f"{settings.reader_record}.{settings.zone_name}"
        ttl = cdk.Duration.seconds(settings.ttl_seconds)
        source = self._address("source")
        target = self._address("target")
        # The writer: one record, switched at once at cutover (never weighted: two writers is split brain).
        route53.CnameRecord(
            self,
            "Writer",
            zone=self.zone,
            record_name=self.writer_name,
            domain_name=source,
            ttl=ttl,
            comment=f"zdm {m.name}: the writer (source until cutover)",
        )
        # The readers: weighted across both sides; the routers move the weights in read_shift.steps.
        for side, address, weight in (("source", source, 100), ("target", target, 0)):
            route53.CnameRecord(
                self,
                f"Reader{side.capitalize()}",
                zone=self.zone,
                record_name=self.reader_name,
                domain_name=address,
                ttl=ttl,
                weight=weight,
                set_identifier=side,
                comment=f"zdm {m.name}: reads on the {side}",
            )

    def _address(self, side: str) -> str:
        proxy = self.sides[side].proxy
        if proxy is not None:
            return proxy.endpoint
        host = getattr(self._ctx.migration, side).host
        assert host is not None
        return str(host)

    def _proxy(self, construct_id: str, side: str, name: str, endpoint: Endpoint, network: Network) -> ProxySide:
        ctx = self._ctx
        db_arns: list[str] = []
        target: rds.ProxyTarget
        if endpoint.rds_cluster_identifier:
            cluster = rds.DatabaseCluster.from_database_cluster_attributes(
                self,
                f"{construct_id}Cluster",
                cluster_identifier=endpoint.rds_cluster_identifier,
                engine=rds.DatabaseClusterEngine.AURORA_POSTGRESQL,
                port=endpoint.port,
            )
            target = rds.ProxyTarget.from_cluster(cluster)
            db_arns.append(ctx.arn("rds", f"cluster:{endpoint.rds_cluster_identifier}"))
        elif endpoint.rds_instance_identifier:
            assert endpoint.host is not None
            instance = rds.DatabaseInstance.from_database_instance_attributes(
                self,
                f"{construct_id}Instance",
                instance_identifier=endpoint.rds_instance_identifier,
                instance_endpoint_address=endpoint.host,
                port=endpoint.port,
                security_groups=[],
                engine=rds.DatabaseInstanceEngine.POSTGRES,
            )
            target = rds.ProxyTarget.from_instance(instance)
            db_arns.append(ctx.arn("rds", f"db:{endpoint.rds_instance_identifier}"))
        else:
            # No RDS identifier in the file: nothing to register behind a proxy; DNS points at the host.
            return ProxySide(side, None, [])
        assert endpoint.secret_arn is not None
        key = (
            kms.Key.from_key_arn(self, f"{construct_id}SecretKey", endpoint.secret_kms_key_arn)
            if endpoint.secret_kms_key_arn
            else None
        )
        secret = secretsmanager.Secret.from_secret_attributes(
            self, f"{construct_id}Secret", secret_complete_arn=endpoint.secret_arn, encryption_key=key
        )
        proxy = rds.DatabaseProxy(
            self,
            f"{construct_id}Proxy",
            db_proxy_name=name,
            proxy_target=target,
            secrets=[secret],
            vpc=network.vpc,
            vpc_subnets=network.subnets,
            security_groups=[network.proxies_sg],
            require_tls=True,
            debug_logging=False,  # debug logs would hold SQL text
            idle_client_timeout=cdk.Duration.minutes(30),
        )
        return ProxySide(side, proxy, db_arns)

    @property
    def zone_arn(self) -> str:
        return self._ctx.arn("route53", f"hostedzone/{self.zone.hosted_zone_id}", region=False, account=False)
