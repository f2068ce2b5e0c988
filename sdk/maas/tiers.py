"""Price tiers: the accuracy level a deployment sells, which picks the price of its requests and
tokens. One rule, shared by the inference service (a deployment's tier), the gateway (metering
by tier) and the CLI (prices beside accuracy in `maas models compare`)."""

from __future__ import annotations

from maas.registry.v1 import registry_pb2

FP32, FP16, INT8, DISTILLED = "fp32", "fp16", "int8", "distilled"
TIERS = (FP32, FP16, INT8, DISTILLED)
# Precision tags that are tiers of their own; any other tag (or none) is priced as full precision.
PRECISION_TIERS = (FP32, FP16, INT8)
# The lineage hyperparameter the trainer writes on every version an optimization job registers.
OPTIMIZATION_METHOD_KEY = "method"
# The version metadata the registry itself sets on every version: "platform" when a MaaS service
# (the trainer) registered it, "upload" when a tenant's key did. Nobody else can set it.
SOURCE_METADATA_KEY = "maas.source"
PLATFORM_SOURCE, UPLOAD_SOURCE = "platform", "upload"


def tier_of_precision(precision: str) -> str:
    """A precision tag's tier: fp32, fp16 or int8; an empty or unknown tag is fp32, so that a
    made-up tag never lowers a price."""
    return precision if precision in PRECISION_TIERS else FP32


def tier_of_version(version: registry_pb2.Version) -> str:
    """`distilled` for a version a distillation job produced (its lineage says method distill),
    else its precision's tier. Only versions the platform produced get a tier below fp32: an
    uploaded version's precision and lineage are its uploader's claims, which nothing checks, so
    an fp32 model tagged int8 must not buy the int8 price."""
    if version.metadata.get(SOURCE_METADATA_KEY) != PLATFORM_SOURCE:
        return FP32
    if version.lineage.hyperparameters.get(OPTIMIZATION_METHOD_KEY) == "distill":
        return DISTILLED
    return tier_of_precision(version.precision)
