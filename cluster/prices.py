"""The published per-second price of a serverless GPU on Azure Container Apps, from Azure's Retail Prices API
(public, no sign-in). `deploy` looks it up for the region and GPU profile and hands it to the apps that show
run costs, so a cost is quoted at the region's published pay-as-you-go rate, with that rate and its source."""

from __future__ import annotations

from dataclasses import dataclass

import requests

from jobs.core.errors import NotFound, Unavailable

RETAIL_PRICES = "https://prices.azure.com/api/retail/prices"
GPU_OF_PROFILE = {"Consumption-GPU-NC8as-T4": "T4", "Consumption-GPU-NC24-A100": "A100"}
SECONDS_PER = {"1 Second": 1.0, "1 Minute": 60.0, "1 Hour": 3600.0, "100 Seconds": 100.0}
MAX_PAGES = 20


@dataclass(frozen=True)
class GpuRate:
    price_per_s: float
    currency: str
    source: str


def query(region: str) -> dict[str, str]:
    """The Retail Prices API's query for Container Apps' pay-as-you-go meters in one region."""
    return {"$filter": f"serviceName eq 'Azure Container Apps' and armRegionName eq '{region}' "
                       "and priceType eq 'Consumption'"}


def gpu_rate(region: str, profile: str, session: requests.Session | None = None) -> GpuRate:
    """Price of one GPU-second of the profile's GPU in the region (the paid tier, after any free grant)."""
    gpu = GPU_OF_PROFILE.get(profile)
    if gpu is None:
        raise NotFound(f"no known GPU for workload profile {profile!r} (known: {', '.join(GPU_OF_PROFILE)})")
    session = session or requests.Session()
    items: list[dict] = []
    url, params = RETAIL_PRICES, query(region)
    for _ in range(MAX_PAGES):
        try:
            page = session.get(url, params=params, timeout=20)
            page.raise_for_status()
            body = page.json()
        except (requests.RequestException, ValueError) as exc:
            raise Unavailable(f"Azure's Retail Prices API did not answer ({type(exc).__name__}); set "
                              "EMBEDDECK_PRICE_PER_UNIT_S to quote costs") from None
        items += body.get("Items", [])
        url, params = body.get("NextPageLink"), None
        if not url:
            break
    meters = [i for i in items if gpu.lower() in f"{i.get('meterName', '')} {i.get('skuName', '')}".lower()
              and "gpu" in f"{i.get('meterName', '')} {i.get('productName', '')}".lower()
              and i.get("unitOfMeasure") in SECONDS_PER and i.get("retailPrice", 0) > 0]
    if not meters:
        raise NotFound(f"Azure's Retail Prices API lists no {gpu} GPU meter for Container Apps in {region}")
    # The paid tier: a meter with a free grant also lists a zero-price tier, which was left out above.
    meter = max(meters, key=lambda i: i.get("tierMinimumUnits", 0))
    per_s = meter["retailPrice"] / SECONDS_PER[meter["unitOfMeasure"]]
    return GpuRate(per_s, meter.get("currencyCode", "USD"),
                   f"Azure retail price, {region}, meter '{meter.get('meterName')}', "
                   f"effective {str(meter.get('effectiveStartDate', ''))[:10]}")
