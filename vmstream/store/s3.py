"""S3Backend: objects in an S3-compatible bucket (AWS, MinIO, Ceph RGW, moto).

A PUT is atomic on S3, so put needs no temp object. get uses a ranged GET so a
reader fetches one chunk out of a pack. botocore's own retries are switched off:
the store's RetryPolicy is the one place retries are decided and bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError

from vmstream.store.backend import Backend, ObjectInfo, check_key, check_range
from vmstream.store.errors import BackendUnavailable, ObjectNotFound, StoreError

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "Throttling"}


class S3Backend(Backend):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        **client_options: Any,
    ) -> None:
        """client_options go to boto3.client (region_name, aws_access_key_id, ...)."""
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.name = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
        )
        client_options.setdefault("region_name", "us-east-1")
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config, **client_options)

    def _error(self, what: str, key: str, exc: Exception) -> Exception:
        msg = f"{self.name}: {what} '{key}' failed: {exc}"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _NOT_FOUND:
                return ObjectNotFound(f"{self.name}: no object '{key}'")
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                return BackendUnavailable(msg)
            return StoreError(msg)
        if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):  # refused, timed out, reset, cut short
            return BackendUnavailable(msg)
        return StoreError(msg)

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + check_key(key), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("put", key, exc) from exc

    def get(self, key: str, offset: int = 0, size: int | None = None) -> bytes:
        check_range(offset, size)
        if size == 0:
            if not self.exists(key):
                raise ObjectNotFound(f"{self.name}: no object '{key}'")
            return b""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + check_key(key)}
        if offset or size is not None:
            args["Range"] = f"bytes={offset}-" + ("" if size is None else str(offset + size - 1))
        try:
            body = self.client.get_object(**args)["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # offset at or past the end: an empty slice, as everywhere
            raise self._error("get", key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("get", key, exc) from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + check_key(key))
            return True
        except (ClientError, BotoCoreError) as exc:
            err = self._error("exists", key, exc)
            if isinstance(err, ObjectNotFound):
                return False
            raise err from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        found = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    found.append(ObjectInfo(obj["Key"][len(self.prefix) :], obj["Size"], obj["LastModified"].timestamp()))
        except (ClientError, BotoCoreError) as exc:
            raise self._error("list", prefix, exc) from exc
        return iter(sorted(found, key=lambda o: o.key))

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + check_key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error("delete", key, exc) from exc

    def close(self) -> None:
        self.client.close()
