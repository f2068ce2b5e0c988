from __future__ import annotations

import asyncio
from pathlib import Path

from grpc_health.v1 import health_pb2
from maas.gateway.v1 import admin_pb2_grpc, billing_pb2_grpc, monitoring_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from services.common.channels import internal_credentials, triton_credentials
from services.common.database import make_engine, upgrade
from services.common.leader import LeaderLock
from services.common.server import App, RunningServer, ServerSpec, Servicer, server_tls
from services.gateway import embed, generate, oip, predict
from services.gateway.admission import Admission, QuotaCache
from services.gateway.audit import AuditLog
from services.gateway.auth import ApiKeyAuthenticator
from services.gateway.billing_service import Billing, BudgetWatch
from services.gateway.billing_servicer import BillingServicer
from services.gateway.billing_sources import MeteredUsage, ReplicaUsage, StorageUsage
from services.gateway.cache import ResponseCache
from services.gateway.config import GatewaySettings
from services.gateway.fleet import Fleet
from services.gateway.http.app import HttpPort
from services.gateway.kek import KekRotation
from services.gateway.limits import Gate, Limiter, LocalLimiter
from services.gateway.monitoring import Monitoring, MonitorSettings
from services.gateway.monitoring_log import PredictionLog, VersionCatalog
from services.gateway.monitoring_servicer import MonitoringServicer
from services.gateway.monitoring_store import MonitoringStore
from services.gateway.monitoring_watch import DriftWatch
from services.gateway.proxy import FORWARDED, Backend, Proxy
from services.gateway.redis_link import RedisLink
from services.gateway.retrain_audit import RetrainAudit
from services.gateway.routes import RouteTable
from services.gateway.scaling_audit import ScalingAudit
from services.gateway.service import Admin
from services.gateway.servicer import AdminServicer
from services.gateway.store import GatewayStore, KeyRecord, RateLimit
from services.gateway.training import TrainingSettlement
from services.gateway.usage import Meter

MIGRATIONS = Path(__file__).parent / "migrations"
# The grpc.health.v1 entry that says whether Redis is reachable (the gateway serves either way).
REDIS_HEALTH = "redis"
# Calls that start training work: checked against the training quota, their jobs settled later.
JOB_CREATING = (
    "/maas.trainer.v1.TrainerService/CreateTrainingJob",
    "/maas.trainer.v1.TrainerService/CreateOptimizationJob",
)


async def open_store(settings: GatewaySettings) -> GatewayStore:
    engine = make_engine(settings.gateway_database_url)
    await asyncio.to_thread(upgrade, engine, MIGRATIONS)
    return GatewayStore(engine)


async def create_app(settings: GatewaySettings) -> App:
    store = await open_store(settings)
    link = RedisLink(settings.redis_url, settings.redis_timeout_seconds, settings.redis_check_seconds)
    audit = AuditLog(store)
    quotas = QuotaCache(store, settings.quota_cache_seconds)
    default_key_limit = RateLimit(settings.default_key_requests_per_second, settings.default_key_burst)
    local = LocalLimiter(
        share=settings.fallback_quota_share,
        policy=settings.gateway_redis_down_policy,
        retry_seconds=settings.redis_check_seconds,
    )
    meter = Meter(link, store, settings.usage_push_seconds, settings.usage_flush_seconds, local.take_usage)
    limiter = Limiter(link, local, count_leased=meter.count_admitted)
    admission = Admission(Gate(limiter, default_key_limit), quotas, meter, audit)
    cache = ResponseCache(
        link, settings.cache_ttl_seconds, settings.cache_max_entry_bytes, settings.cache_memory_bytes
    )
    authenticator = ApiKeyAuthenticator(store, settings.auth_cache_seconds, admission=admission, audit=audit)
    admin = Admin(store, on_revoke=authenticator.forget, quotas=quotas, meter=meter, audit=audit)
    addresses = {
        "registry": settings.registry_addr,
        "inference": settings.inference_addr,
        "trainer": settings.trainer_addr,
    }
    credentials = internal_credentials(settings)
    backends = {name: Backend.open(name, addresses[name], credentials) for name in FORWARDED}
    settlement = TrainingSettlement(
        store, backends["trainer"].channel, settings.internal_token, admission, settings.training_settle_seconds
    )
    proxy = Proxy(
        settings.internal_token,
        backends,
        served_here={predict.PREDICT_PATH, generate.GENERATE_PATH, embed.EMBED_PATH},
        audit=audit,
        meter=meter,
        guards={path: admission.check_training for path in JOB_CREATING},
        recorders={path: settlement.record for path in JOB_CREATING},
        quotas=quotas,
    )
    routes = RouteTable(
        backends["inference"].channel,
        settings.internal_token,
        settings.predict_timeout_seconds,
        triton_token=settings.triton_token,
        triton_credentials=triton_credentials(settings),
        coalesce=settings.gateway_coalesce,
    )
    routes.on_scaling = ScalingAudit(audit, link).heard
    billing = Billing(
        store,
        [
            MeteredUsage(store, meter.flush),
            StorageUsage(backends["registry"].channel, settings.internal_token),
            ReplicaUsage(backends["inference"].channel, settings.internal_token),
        ],
        settings.billing_currency,
        settings.billing_finalize_grace_seconds,
    )
    budgets = BudgetWatch(
        billing, LeaderLock(settings.gateway_database_url, "gateway-billing"), settings.billing_refresh_seconds
    )
    generation = generate.Generation(routes, admission, meter)
    monitor_store = MonitoringStore(store.engine)
    predictions = PredictionLog(
        monitor_store,
        VersionCatalog(backends["registry"].channel, settings.internal_token),
        queue_size=settings.monitor_queue_size,
        bucket_seconds=settings.monitor_bucket_seconds,
        flush_seconds=settings.monitor_flush_seconds,
        refresh_seconds=settings.monitor_config_refresh_seconds,
    )
    monitoring = Monitoring(
        monitor_store,
        predictions,
        predictions.catalog,
        routes,
        MonitorSettings(
            settings.monitor_byte_budget_per_day,
            settings.monitor_retention_days,
            settings.monitor_window_seconds,
            settings.monitor_drift_threshold,
        ),
    )
    drift_watch = DriftWatch(
        monitoring,
        routes,
        LeaderLock(settings.gateway_database_url, "gateway-monitoring"),
        backends["trainer"].channel,
        backends["inference"].channel,
        settings.internal_token,
        audit,
        settings.monitor_interval_seconds,
        settings.monitor_canary_quality_drop,
    )
    retrain_audit = RetrainAudit(
        store,
        backends["trainer"].channel,
        settings.internal_token,
        LeaderLock(settings.gateway_database_url, "gateway-retrain-audit"),
        settings.gateway_retrain_audit_seconds,
    )
    spec = ServerSpec(
        service="gateway",
        address=settings.gateway_addr,
        servicers=[
            Servicer(
                admin_pb2_grpc.add_AdminServiceServicer_to_server,
                AdminServicer(admin, Fleet(proxy), KekRotation(proxy), audit),
                "maas.gateway.v1.AdminService",
            ),
            Servicer(
                billing_pb2_grpc.add_BillingServiceServicer_to_server,
                BillingServicer(billing, audit),
                "maas.gateway.v1.BillingService",
            ),
            Servicer(
                monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server,
                MonitoringServicer(monitoring, audit),
                "maas.gateway.v1.MonitoringService",
            ),
            # Predict alone; the proxy below serves the rest of InferenceService.
            Servicer(
                predict.add_to_server, predict.PredictHandler(routes, proxy, cache, meter, predictions), predict.SERVICE
            ),
            Servicer(
                generate.add_to_server, generate.GenerateHandler(generation), generate.SERVICE
            ),
            Servicer(embed.add_to_server, embed.EmbedHandler(routes, proxy, cache, meter), embed.SERVICE),
            Servicer(
                service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
                oip.OipServicer(routes, cache, meter, generation, predictions),
                oip.SERVICE,
            ),
        ],
        authenticate=authenticator,
        max_message_bytes=settings.max_message_bytes,
        generic_handlers=[proxy],
        generic_service_names=[service.full_name for service in FORWARDED.values()],
        tls=server_tls(settings),
        reuse_port=settings.gateway_workers > 1,
    )
    # The same servicers and authentication, called in process for each HTTP request.
    http = HttpPort(spec, settings) if settings.gateway_http_addr else None

    async def on_start(server: RunningServer) -> None:
        async def report_redis(up: bool) -> None:
            status = (
                health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await server.health.set(REDIS_HEALTH, status)

        link.on_change = report_redis
        await report_redis(False)
        await link.start()
        routes.start()
        audit.start()
        meter.start()
        limiter.start()
        settlement.start()
        budgets.start()
        await predictions.start()
        drift_watch.start()
        retrain_audit.start()
        if http is not None:
            await http.start()

    async def on_stop() -> None:
        if http is not None:
            await http.stop()
        await budgets.close()
        await drift_watch.close()
        await retrain_audit.close()
        await predictions.close()
        await settlement.close()
        await routes.close()
        for backend in backends.values():
            await backend.close()
        await cache.drain()
        await limiter.close()
        await meter.close()
        await audit.close()
        await link.close()
        store.engine.dispose()

    return App(spec, on_start=on_start, on_stop=on_stop)


async def bootstrap_admin(settings: GatewaySettings, key_file: Path, force: bool = False) -> KeyRecord | None:
    store = await open_store(settings)
    try:
        return await Admin(store).bootstrap_admin(key_file, force=force)
    finally:
        store.engine.dispose()
