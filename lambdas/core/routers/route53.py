"""Route53 as the router: records in a private hosted zone.

- The writer record is one plain record (never weighted: two writers is split brain). The
  switch UPSERTs its value to the other side's address in a single change, so it moves at once.
- The reader record is a weighted pair with set identifiers `source` and `target`; reads move
  in steps, weights (100 - p, p) for p percent of reads on the target.
Each change is waited for until GetChange reports INSYNC (every Route53 server answers with
it). Values that are IP addresses become A records, host names CNAME records.

The two addresses (a database's host, or the RDS Proxy in front of it) are given, or read
from the reader pair the stack created (stacks/traffic.py): its `source` and `target` set
identifiers hold them.

DNS cannot hold clients: `begin_hold` returns a handle that is already done, and the
database fence alone refuses writes (clients see read-only errors for the length of the
fence). Clients keep cached answers for up to the TTL after a switch: the old writer stays
fenced (read-only) after the cutover, so a late client cannot write there.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any, Protocol

from lambdas.core.routers.base import NoHold, RouterError, RouterState, Side, TrafficRouter, check_weight


class Route53Client(Protocol):
    def change_resource_record_sets(self, **kwargs: Any) -> dict[str, Any]: ...

    def get_change(self, **kwargs: Any) -> dict[str, Any]: ...

    def list_resource_record_sets(self, **kwargs: Any) -> dict[str, Any]: ...


def _record_type(value: str) -> str:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return "CNAME"
    return "AAAA" if address.version == 6 else "A"


class Route53Router(TrafficRouter):
    name = "route53"

    def __init__(
        self,
        client: Route53Client,
        *,
        hosted_zone_id: str,
        zone_name: str,
        source_value: str | None = None,
        target_value: str | None = None,
        writer_record: str = "writer",
        reader_record: str = "reader",
        ttl_seconds: int = 5,
        insync_timeout: float = 180.0,
        poll_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._zone_id = hosted_zone_id
        # Route53 stores and lists names in lowercase, whatever case they were given in
        zone = zone_name.rstrip(".").lower()
        self.writer_name = f"{writer_record.lower()}.{zone}."
        self.reader_name = f"{reader_record.lower()}.{zone}."
        self._values: dict[Side, str] | None = None
        if source_value is not None and target_value is not None:
            self._values = self._checked({Side.SOURCE: source_value, Side.TARGET: target_value})
        elif source_value is not None or target_value is not None:
            raise RouterError("give both the source's and the target's address, or neither (then they are read)")
        self._ttl = ttl_seconds
        self._insync_timeout = insync_timeout
        self._poll = poll_interval
        self._clock = clock
        self._sleep = sleep

    @staticmethod
    def _checked(values: dict[Side, str]) -> dict[Side, str]:
        if len({_record_type(v) for v in values.values()}) != 1:
            raise RouterError(
                "source and target must both be host names or both be addresses "
                f"(got {values[Side.SOURCE]!r}, {values[Side.TARGET]!r})"
            )
        return values

    def _addresses(self) -> dict[Side, str]:
        if self._values is None:
            found: dict[Side, str] = {}
            for record in self._records(self.reader_name):
                ident = record.get("SetIdentifier")
                if ident in (Side.SOURCE.value, Side.TARGET.value) and record.get("ResourceRecords"):
                    found[Side(ident)] = str(record["ResourceRecords"][0]["Value"])
            if set(found) != {Side.SOURCE, Side.TARGET}:
                raise RouterError(
                    f"the weighted reader records {self.reader_name} (set identifiers 'source' and 'target') are not "
                    f"in zone {self._zone_id}: deploy the stack, or give both addresses"
                )
            self._values = self._checked(found)
        return self._values

    @property
    def _type(self) -> str:
        return _record_type(self._addresses()[Side.SOURCE])

    def _records(self, name: str) -> list[dict[str, Any]]:
        """Every record set named `name` (any type), following pages."""
        found: list[dict[str, Any]] = []
        params: dict[str, Any] = {"HostedZoneId": self._zone_id, "StartRecordName": name}
        while True:
            page = self._client.list_resource_record_sets(**params)
            for record in page.get("ResourceRecordSets", []):
                if record["Name"] != name:
                    return found
                found.append(record)
            if not page.get("IsTruncated"):
                return found
            params = {"HostedZoneId": self._zone_id, "StartRecordName": page["NextRecordName"]}
            params["StartRecordType"] = page["NextRecordType"]
            if "NextRecordIdentifier" in page:
                params["StartRecordIdentifier"] = page["NextRecordIdentifier"]

    def _apply(self, changes: list[dict[str, Any]], comment: str) -> None:
        response = self._client.change_resource_record_sets(
            HostedZoneId=self._zone_id, ChangeBatch={"Comment": comment, "Changes": changes}
        )
        self._wait_insync(response["ChangeInfo"]["Id"])

    def _wait_insync(self, change_id: str) -> None:
        started = self._clock()
        while True:
            status = self._client.get_change(Id=change_id)["ChangeInfo"]["Status"]
            if status == "INSYNC":
                return
            if self._clock() - started >= self._insync_timeout:
                raise RouterError(
                    f"Route53 change {change_id} still {status} after {self._insync_timeout:g}s; it will apply, "
                    "but callers waiting for it gave up (raise route53.insync_timeout_seconds)"
                )
            self._sleep(self._poll)

    def set_read_weight(self, target_percent: int) -> None:
        p = check_weight(target_percent)
        addresses = self._addresses()
        changes = [
            {
                "Action": "UPSERT",
                "ResourceRecordSet": {
                    "Name": self.reader_name,
                    "Type": self._type,
                    "SetIdentifier": side.value,
                    "Weight": weight,
                    "TTL": self._ttl,
                    "ResourceRecords": [{"Value": addresses[side]}],
                },
            }
            for side, weight in ((Side.SOURCE, 100 - p), (Side.TARGET, p))
        ]
        self._apply(changes, f"zdm: {p}% of reads on the target")

    def begin_hold(self) -> NoHold:
        return NoHold()

    def switch_writer(self, side: Side) -> None:
        change = {
            "Action": "UPSERT",
            "ResourceRecordSet": {
                "Name": self.writer_name,
                "Type": self._type,
                "TTL": self._ttl,
                "ResourceRecords": [{"Value": self._addresses()[side]}],
            },
        }
        self._apply([change], f"zdm: writer to the {side.value}")

    def release(self) -> None:
        return None

    @property
    def stale_seconds(self) -> float:
        return float(self._ttl)

    def state(self) -> RouterState:
        addresses = self._addresses()
        writer: Side | None = None
        weights: dict[Side, int] = {}
        for record in self._records(self.writer_name):
            if "SetIdentifier" not in record and record.get("ResourceRecords"):
                value = record["ResourceRecords"][0]["Value"]
                writer = next((side for side, address in addresses.items() if _same(address, value)), None)
        for record in self._records(self.reader_name):
            ident = record.get("SetIdentifier")
            if ident in (Side.SOURCE.value, Side.TARGET.value):
                weights[Side(ident)] = int(record.get("Weight", 0))
        total = sum(weights.values())
        if total:
            read: int | None = round(100 * weights.get(Side.TARGET, 0) / total)
        elif len(weights) == 2:
            read = 50  # every weight 0: Route53 answers with each record alike
        else:
            read = None
        return RouterState(writer, read, holding=False)


def _same(a: str, b: str) -> bool:
    return a.rstrip(".").lower() == b.rstrip(".").lower()
