from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from services.common.settings import CommonSettings

MIB = 1024 * 1024


def _default_database_url(data: dict[str, Any]) -> str:
    return f"sqlite:///{Path(data['home']) / 'registry' / 'registry.db'}"


def _default_blob_dir(data: dict[str, Any]) -> Path:
    return Path(data["home"]) / "registry" / "blobs"


def _default_kek_file(data: dict[str, Any]) -> Path:
    return Path(data["home"]) / "kek"


class RegistrySettings(CommonSettings):
    # registry_addr (where it listens) lives in CommonSettings: its peers read it too.
    registry_metrics_addr: str = "127.0.0.1:9152"
    # SQLite under $MAAS_HOME by default; PostgreSQL by URL, e.g.
    # postgresql+psycopg://postgres@127.0.0.1:5432/registry
    registry_database_url: str = Field(default_factory=_default_database_url)
    # Content-addressed artifact and dataset bytes (blobs/sha256/<ab>/<hex>).
    registry_blob_dir: Path = Field(default_factory=_default_blob_dir)
    # Set: blobs live in this S3-compatible bucket instead (uploads still spool under
    # registry_blob_dir/tmp). Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    registry_s3_bucket: str = ""
    registry_s3_prefix: str = ""
    # MinIO, SeaweedFS, Ceph RGW, ...: their URL, e.g. http://minio:9000. Empty: AWS S3.
    registry_s3_endpoint_url: str = ""
    registry_s3_region: str = "us-east-1"
    # The key-encryption key (KEK): 32 random bytes, base64, in a file other users cannot read.
    # It wraps every blob's data key. `maas up` creates it (so does the registry's first start
    # with no data key yet); at scale a Kubernetes Secret mounted as this file. Backups never
    # hold it: keep a copy apart from them, without it no encrypted blob can be read.
    registry_kek_file: Path = Field(default_factory=_default_kek_file)
    # Encrypt new blobs at rest (AES-256-GCM, one data key per blob). Leave it on: it exists so
    # that the benchmark can compare with and without in one run. Blobs written without
    # encryption (before it existed, or with this off) still read either way: a blob without a
    # data key is read as stored.
    registry_encryption: bool = True
    # Size of each chunk DownloadVersion / DownloadDatasetVersion sends.
    registry_chunk_bytes: int = MIB
    # Largest artifact or dataset file an upload may declare.
    registry_max_artifact_bytes: int = 4 * 1024 * MIB
    # How often (and once at start) the bytes each tenant stores are sampled for billing
    # (storage_usage: the UTC day's largest sample, billed per GB-month).
    registry_storage_sample_seconds: float = Field(default=3600.0, gt=0)
    # TEST-ONLY: true skips the TorchScript operator allowlist at upload (the pickle scan and the
    # format checks stay on), so a test can prove the runtime fence alone holds. Never set it in
    # a deployment: a model could then call aten::from_file or custom operators.
    registry_unsafe_skip_operator_check: bool = False

    @model_validator(mode="after")
    def _check_sizes(self) -> RegistrySettings:
        # A download chunk plus its message framing must fit in one gRPC message.
        if not 0 < self.registry_chunk_bytes <= self.max_message_bytes // 2:
            raise ValueError(
                f"registry_chunk_bytes ({self.registry_chunk_bytes}) must be positive and at most half "
                f"of max_message_bytes ({self.max_message_bytes})"
            )
        if self.registry_max_artifact_bytes < 1:
            raise ValueError("registry_max_artifact_bytes must be positive")
        return self
