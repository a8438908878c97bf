"""The validation store in S3 (the bucket the stack creates for this migration)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lambdas.core.validation.store import ValidationStore

READERS = 64  # the summary reads one object per chunk: many at once (S3 latency, not bandwidth)


class S3ValidationStore(ValidationStore):
    """`client` should pool `READERS` connections (botocore's default is 10: more readers than that
    would open and drop connections)."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._s3 = client
        self._bucket = bucket

    def location(self) -> str:
        return self._bucket

    def put_object(self, key: str, body: bytes) -> None:
        self._s3.put_object(Bucket=self._bucket, Key=key, Body=body, ContentType="application/json")

    def get_object(self, key: str) -> bytes:
        body: bytes = self._s3.get_object(Bucket=self._bucket, Key=key)["Body"].read()
        return body

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def get_objects(self, keys: Sequence[str]) -> list[bytes]:
        with ThreadPoolExecutor(max_workers=READERS) as pool:
            return list(pool.map(self.get_object, keys))
