from __future__ import annotations

import os

from pydantic import Field, field_validator, model_validator

from services.common.settings import CommonSettings
from services.gateway.billing import check_currency
from services.gateway.limits import RedisDownPolicy


class GatewaySettings(CommonSettings):
    # The public endpoint (MAAS_GATEWAY_ADDR): clients, the SDK and the CLI dial it.
    gateway_addr: str = "127.0.0.1:50051"
    gateway_metrics_addr: str = "127.0.0.1:9151"
    # The HTTP port (MAAS_GATEWAY_HTTP_ADDR): the OpenAI-compatible API (/v1) and KServe v2 REST
    # (/v2), with the gRPC port's keys, limits and TLS. Empty turns it off.
    gateway_http_addr: str = "127.0.0.1:50080"
    # Gateway processes serving gateway_addr together (SO_REUSEPORT), under one primary that
    # serves their merged metrics: by default one per core, at most 8.
    gateway_workers: int = Field(default_factory=lambda: min(os.cpu_count() or 1, 8), ge=1, le=64)
    # Empty means the embedded SQLite file under `home`.
    gateway_database_url: str = ""
    # How long a key lookup (found or not) is reused; bounds how late a revocation takes effect.
    auth_cache_seconds: float = 1.0
    # Deadline for the call to Triton when the client sent none, so that nothing waits forever.
    predict_timeout_seconds: float = 60.0

    # Join calls that queue behind calls in flight to the same model into one Triton batch.
    gateway_coalesce: bool = True

    # Rate limit of every key without one of its own (SetApiKeyRateLimit); 0 = unlimited.
    default_key_requests_per_second: float = 0.0
    default_key_burst: int = 0
    # How long a tenant's quota (read from SQL) is reused; bounds how late SetQuota takes effect.
    quota_cache_seconds: float = 1.0
    # Redis: per-command timeout, and how often its health is checked (and a lost one retried).
    redis_timeout_seconds: float = 0.25
    redis_check_seconds: float = 0.5
    # While Redis is unreachable, calls a quota applies to are admitted from a lease ("lease": each
    # gateway process up to its share of what was left) or refused ("refuse").
    gateway_redis_down_policy: RedisDownPolicy = RedisDownPolicy.LEASE
    # The gateways sharing one Redis (each with gateway_workers processes); while Redis is down
    # each process's default share is 1 / (gateway_processes x gateway_workers).
    gateway_processes: int = Field(default=1, ge=1)
    # A process's share of a quota's remainder while Redis is down; 0: the default above.
    gateway_fallback_quota_share: float = Field(default=0.0, ge=0.0, le=1.0)
    # The request cache, for deployments marked cacheable.
    cache_ttl_seconds: float = 300.0
    cache_max_entry_bytes: int = 1024 * 1024
    # The hottest cached answers also kept in each gateway process's memory; 0 turns that off.
    cache_memory_bytes: int = Field(default=32 * 1024 * 1024, ge=0)
    # Usage counters: in memory -> Redis every push interval, Redis -> SQL every flush interval.
    usage_push_seconds: float = 1.0
    usage_flush_seconds: float = 10.0
    # How often jobs created through the gateway are checked and, once ended, their run time
    # counted against the training quota; 0 turns settling off.
    training_settle_seconds: float = 5.0
    # How often the trainer's new retraining events are copied into the audit log, by one gateway
    # process of all those sharing the database; 0 turns it off.
    gateway_retrain_audit_seconds: float = Field(default=5.0, ge=0)
    # The price book's one currency (ISO 4217): prices, invoices and budgets are in it.
    billing_currency: str = "USD"
    # How often the budget gauge (maas_billing_budget_used_ratio) is recomputed, by one gateway
    # process of all those sharing the database; 0 turns it off.
    billing_refresh_seconds: float = Field(default=300.0, ge=0)
    # How long after a month ends it may be finalized: usage still in gateway memory, Redis or a
    # job not yet settled reaches SQL by then.
    billing_finalize_grace_seconds: float = Field(default=3600.0, ge=0)
    # Prediction logging (MonitoringService): what SetPredictionLogging's 0 means for the payload
    # bytes a deployment keeps per UTC day and the days its samples and summaries are kept.
    monitor_byte_budget_per_day: int = Field(default=64 * 1024 * 1024, ge=0)
    monitor_retention_days: int = Field(default=7, ge=1)
    # Sampled calls waiting to be summarized and written, per gateway process; beyond it a sampled
    # call is dropped (and counted) rather than slow the call path.
    monitor_queue_size: int = Field(default=10_000, ge=1)
    # How often a process writes what it logged to SQL, and rereads every deployment's logging
    # settings (how late a change made through another process takes effect there).
    monitor_flush_seconds: float = Field(default=1.0, gt=0)
    monitor_config_refresh_seconds: float = Field(default=2.0, gt=0)
    # Summaries are stored per deployment, version and bucket of this many seconds.
    monitor_bucket_seconds: int = Field(default=60, ge=1)
    # Drift: one gateway process (of all sharing the database) compares each logged deployment's
    # last window with its version's baseline every interval (0 turns it off), exports the PSI and
    # live quality, reports drift to the trainer, rolls back a canary whose live quality dropped,
    # and deletes samples past their retention.
    monitor_interval_seconds: float = Field(default=60.0, ge=0)
    monitor_window_seconds: float = Field(default=3600.0, gt=0)
    monitor_drift_threshold: float = Field(default=0.2, gt=0)
    # A canary whose live accuracy (or R^2) is lower than its deployment's version's by more than
    # this, both on enough labelled samples of the window, is rolled back.
    monitor_canary_quality_drop: float = Field(default=0.05, ge=0)

    @property
    def fallback_quota_share(self) -> float:
        return self.gateway_fallback_quota_share or 1 / (self.gateway_processes * self.gateway_workers)

    @field_validator("billing_currency")
    @classmethod
    def _currency(cls, currency: str) -> str:
        return check_currency(currency)

    @model_validator(mode="after")
    def _default_database(self) -> GatewaySettings:
        if not self.gateway_database_url:
            self.gateway_database_url = self.sqlite_url("gateway")
        return self
