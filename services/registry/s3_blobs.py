"""Blobs in an S3-compatible bucket (AWS S3, MinIO, SeaweedFS, Ceph RGW, ...).

Uploads spool into a local temp file and are verified exactly like the local store's; only a
verified file is uploaded, under the same content address (sha256/<ab>/<hex>) below an optional
prefix. A PUT of one object is atomic in S3, so readers never see a partial blob. With
encryption at rest the file uploaded is the sealed one: the bucket holds ciphertext only.
Credentials
come from the usual AWS sources (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or the
pod's role).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from services.registry.blobs import (
    SHA256_HEX,
    BeforeNew,
    Sealing,
    SpooledBlobWriter,
    blob_key,
    sweep_temp_dir,
)

MISSING = {"404", "NoSuchKey", "NotFound"}


class S3BlobStore:
    def __init__(
        self,
        bucket: str,
        temp_dir: Path,
        *,
        prefix: str = "",
        endpoint_url: str = "",
        region: str = "us-east-1",
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.temp_dir = temp_dir
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region,
            # Path-style addressing: what self-hosted S3-compatible servers expect.
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
        )

    def key_of(self, sha256: str) -> str:
        return self.prefix + blob_key(sha256)

    def sweep_temps(self) -> None:
        sweep_temp_dir(self.temp_dir)

    def begin_write(self, sealing: Sealing | None = None) -> SpooledBlobWriter:
        return SpooledBlobWriter(self.temp_dir / f"{uuid.uuid4().hex}.part", self.put_file, sealing)

    def open(self, sha256: str) -> BinaryIO:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key_of(sha256))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in MISSING:
                raise FileNotFoundError(f"s3://{self.bucket}/{self.key_of(sha256)}") from None
            raise
        # A StreamingBody: read(n) and close(), all the registry's downloads use.
        return cast(BinaryIO, reply["Body"])

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key_of(sha256))

    def digests(self) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "sha256/")
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"].rsplit("/", 1)[-1]
                if SHA256_HEX.match(name):
                    yield name

    def exists(self, sha256: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key_of(sha256))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in MISSING:
                return False
            raise
        return True

    def put_file(self, path: Path, sha256: str, before_new: BeforeNew | None = None) -> None:
        key = self.key_of(sha256)
        try:
            # Content-addressed: the same bytes already stored need no second upload.
            if not self.exists(sha256):
                if before_new is not None:
                    before_new()
                self.client.upload_file(str(path), self.bucket, key)
        finally:
            path.unlink(missing_ok=True)
