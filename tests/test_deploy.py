"""Azure Container Apps deployment bodies, field by field; container files pass hadolint."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests

from cluster import deploy
from jobs.core.errors import BadRequest

REPO = Path(__file__).resolve().parent.parent
ENV = {
    "AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000001", "AZURE_RESOURCE_GROUP": "rg-embed",
    "AZURE_LOCATION": "swedencentral",
    "EMBEDDECK_ACA_SUBNET_ID": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v"
                               "/subnets/aca",
    "EMBEDDECK_STORAGE_ACCOUNT": "embedstore", "EMBEDDECK_STORAGE_KEY": "StorageKey==secret",
    "EMBEDDECK_CONTROLLER_IMAGE": "acr.io/embeddeck/controller:1",
    "EMBEDDECK_WORKER_IMAGE": "acr.io/embeddeck/worker:1",
    "EMBEDDECK_API_TOKEN": "tok-secret-123", "EMBEDDECK_DB_URL": "mssql+pyodbc://sa:Passw0rd!@sql:1433/db",
    "EMBEDDECK_SPARK_SECRET": "Sp4rk-cluster-secret", "EMBEDDECK_AUTOSCALE_TOKEN": "Keda-read-only-1",
    "EMBEDDECK_ACA_DEFAULT_DOMAIN": "kindocean-1a2b3c4d.swedencentral.azurecontainerapps.io",
    "EMBEDDECK_ACR_SERVER": "embeddeck.azurecr.io",
    "EMBEDDECK_ACA_IDENTITY_ID": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.ManagedIdentity"
                                 "/userAssignedIdentities/embeddeck-pull",
    "EMBEDDECK_LOG_WORKSPACE_ID": "5b1e6c2a-0000-0000-0000-00000000abcd", "EMBEDDECK_LOG_WORKSPACE_KEY": "LogKey==",
    "EMBEDDECK_MAX_WORKERS": "6",
}


def bodies():
    config, missing = deploy.AcaConfig.from_env(ENV)
    assert missing == []
    return {r["name"]: r for r in deploy.dry_run(config)}


def test_environment_has_vnet_and_serverless_gpu_profile():
    env = bodies()["embeddeck-env"]["body"]
    assert env["location"] == "swedencentral"
    props = env["properties"]
    assert props["vnetConfiguration"] == {"infrastructureSubnetId": ENV["EMBEDDECK_ACA_SUBNET_ID"], "internal": False}
    profiles = {p["name"]: p["workloadProfileType"] for p in props["workloadProfiles"]}
    assert profiles == {"Consumption": "Consumption", "gpu": "Consumption-GPU-NC8as-T4"}


def test_storage_is_the_azure_files_share_with_masked_key():
    st = bodies()["embeddeck"]["body"]["properties"]["azureFile"]
    assert st == {"accountName": "embedstore", "accountKey": "***", "shareName": "embeddeck", "accessMode": "ReadWrite"}


def test_controller_ports_secrets_and_volume():
    props = bodies()["embeddeck-controller"]["body"]["properties"]
    ingress = props["configuration"]["ingress"]
    assert (ingress["external"], ingress["targetPort"], ingress["transport"]) == (True, 8888, "http")
    ports = {p["targetPort"]: p["external"] for p in ingress["additionalPortMappings"]}
    assert ports == {7077: False, 7078: False, 7079: False, 8080: False}  # nothing public but the API
    assert props["workloadProfileName"] == "Consumption"
    container = props["template"]["containers"][0]
    env = {e["name"]: e.get("value", e.get("secretRef")) for e in container["env"]}
    assert env["APP_MODE"] == "trigger" and env["EMBEDDECK_API_TOKEN"] == "api-token"
    assert env["EMBEDDECK_DB_URL"] == "db-url" and env["EMBEDDECK_DRIVER_HOST"] == "embeddeck-controller"
    assert env["EMBEDDECK_DRIVER_PORT"] == "7078" and env["EMBEDDECK_BLOCK_MANAGER_PORT"] == "7079"
    assert container["volumeMounts"] == [{"volumeName": "share", "mountPath": "/data"}]
    assert props["template"]["volumes"] == [{"name": "share", "storageType": "AzureFile", "storageName": "embeddeck"}]
    assert props["template"]["scale"] == {"minReplicas": 1, "maxReplicas": 1}


def test_worker_gpu_profile_no_ingress_and_keda_rule():
    props = bodies()["embeddeck-worker"]["body"]["properties"]
    assert props["workloadProfileName"] == "gpu"
    assert "ingress" not in props["configuration"]
    scale = props["template"]["scale"]
    assert (scale["minReplicas"], scale["maxReplicas"]) == (0, 6)
    rule = scale["rules"][0]["custom"]
    assert rule["type"] == "metrics-api"
    # KEDA's metrics-api scaler: url, valueLocation (a GJSON path into the answer), targetValue, and
    # authMode bearer with the token in the trigger parameter "token". ACA serves an app's HTTP ingress on
    # 443 at <app>.internal.<environment default domain> inside the environment; app:port is for TCP only.
    assert rule["metadata"] == {"url": "https://embeddeck-controller.internal.kindocean-1a2b3c4d.swedencentral"
                                       ".azurecontainerapps.io/autoscale",
                                "valueLocation": "desired", "targetValue": "1", "authMode": "bearer"}
    assert rule["auth"] == [{"secretRef": "autoscale-token", "triggerParameter": "token"}]
    secrets = {x["name"] for x in props["configuration"]["secrets"]}
    assert "api-token" not in secrets  # workers hold no token that can launch runs
    env = {e["name"]: e.get("value") for e in props["template"]["containers"][0]["env"]}
    assert env["SPARK_MASTER_URL"] == "spark://embeddeck-controller:7077" and env["APP_MODE"] == "worker"


def test_no_secret_in_plain_text_anywhere():
    text = json.dumps(bodies())
    for secret in ("tok-secret-123", "Passw0rd!", "StorageKey==secret", "mssql+pyodbc", "Sp4rk-cluster-secret",
                   "Keda-read-only-1", "LogKey=="):
        assert secret not in text


def test_both_apps_hold_the_spark_secret_by_reference():
    """Master, driver (controller) and executors (workers) admit only holders of the cluster's secret."""
    for name in ("embeddeck-controller", "embeddeck-worker"):
        props = bodies()[name]["body"]["properties"]
        assert {"name": "spark-auth", "value": "***"} in props["configuration"]["secrets"]
        env = {e["name"]: e for e in props["template"]["containers"][0]["env"]}
        assert env["_SPARK_AUTH_SECRET"] == {"name": "_SPARK_AUTH_SECRET", "secretRef": "spark-auth"}


def test_cli_dry_run_names_what_is_missing_and_real_run_refuses():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "EMBEDDECK_"))}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-m", "cluster", "deploy", "--dry-run"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0
    report = json.loads(out.stdout)
    assert "AZURE_SUBSCRIPTION_ID" in report["missing"] and len(report["resources"]) == 4
    out = subprocess.run([sys.executable, "-m", "cluster", "deploy"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 2 and "needs these environment variables: AZURE_SUBSCRIPTION_ID" in out.stderr


@pytest.mark.parametrize("dockerfile", sorted((REPO / "docker").glob("Dockerfile.*")))
def test_hadolint(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("mode,extra,message", [
    ("bogus", {}, "APP_MODE must be dashboard, trigger, jupyter"),
    ("jupyter", {}, "Jupyter never runs without a token"),
    ("jupyter", {"JUPYTER_TOKEN": " "}, "JUPYTER_TOKEN must be at least 24 characters"),
    ("jupyter", {"JUPYTER_TOKEN": " " * 30}, "JUPYTER_TOKEN must be at least 24 characters"),
    ("worker", {}, "set SPARK_MASTER_URL"),
    ("dashboard", {}, "refusing to serve the dashboard on 0.0.0.0 without authentication"),
    ("dashboard", {"EMBEDDECK_DASHBOARD_AUTH": "maybe"}, "EMBEDDECK_DASHBOARD_AUTH must be none, proxy or oidc"),
])
def test_entrypoint_refuses_what_it_must(mode, extra, message):
    env = {k: v for k, v in os.environ.items()
           if k not in ("JUPYTER_TOKEN", "SPARK_MASTER_URL", "EMBEDDECK_DASHBOARD_AUTH", "DASHBOARD_ADDRESS")}
    env.update(APP_MODE=mode, PATH=f"{Path(sys.executable).parent}:{env['PATH']}", **extra)
    out = subprocess.run(["bash", str(REPO / "docker" / "entrypoint.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and message in out.stderr


@pytest.mark.spark
def test_the_controller_ends_with_its_master_and_starts_its_run_service_again(tmp_path, monkeypatch):
    """The controller's entrypoint exec'd its front door beside a background master and run service: a dead master
    left the API answering 503 to every run while the platform's probes, which reach the door, found it healthy,
    and a dead run service was never started again. Its master is also the local backend's, whose Stop ends the
    container. Run here as the image runs it, on loopback."""
    import secrets
    import signal

    from cluster.local import LocalCluster
    from jobs.core.processes import free_port
    from jobs.spark import run_service
    from tests.conftest import wait_until

    master_port, api_port = free_port(), free_port()
    env = dict(os.environ, APP_MODE="trigger", EMBEDDECK_HOME=str(tmp_path), SPARK_MASTER_HOST="127.0.0.1",
               SPARK_MASTER_PORT=str(master_port), SPARK_MASTER_WEBUI_PORT=str(free_port()),
               EMBEDDECK_SPARK_MASTER=f"spark://127.0.0.1:{master_port}", API_ADDRESS="127.0.0.1",
               EMBEDDECK_API_PORT=str(api_port), EMBEDDECK_API_TOKEN="controller-test",
               _SPARK_AUTH_SECRET=secrets.token_hex(16), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("EMBEDDECK_HOME", str(tmp_path))  # run_service reads this home's state
    monkeypatch.setenv("EMBEDDECK_MASTER_PORT", env["SPARK_MASTER_PORT"])  # the local backend, on its ports
    monkeypatch.setenv("EMBEDDECK_MASTER_WEBUI_PORT", env["SPARK_MASTER_WEBUI_PORT"])
    proc = subprocess.Popen(["bash", str(REPO / "docker" / "entrypoint.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def health():
        try:
            return requests.get(f"http://127.0.0.1:{api_port}/healthz", timeout=2).json()["checks"]["master"]
        except (requests.RequestException, ValueError):
            return False

    try:
        wait_until(health, timeout=120, what="the API with its master")
        first = wait_until(run_service.info, timeout=120, what="the run service")
        os.kill(first["pid"], signal.SIGKILL)
        again = wait_until(lambda: (s := run_service.info()) and s["pid"] != first["pid"] and s, timeout=120,
                           what="the run service started again")
        assert again["master"] == env["EMBEDDECK_SPARK_MASTER"]
        # The local backend beside it (the dashboard's Cluster page, `python -m cluster`) sees this master as its
        # cluster's, and its Stop reaches it: the page said "Spark master is down" and offered to start another.
        cluster = LocalCluster()
        assert cluster.master_state().status == "ALIVE" and cluster.master_url() == env["EMBEDDECK_SPARK_MASTER"]
        cluster.down()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        run_service.stop()
    assert proc.returncode == 1 and "the Spark master exited" in out, out[-3000:]
    assert not health()


@pytest.mark.spark
@pytest.mark.parametrize("mode", ["worker", "trigger", "dashboard"])
def test_the_entrypoint_as_pid_1_stops_on_sigterm(tmp_path, mode):
    """In its container the entrypoint is PID 1, and bash as PID 1 ignores a SIGTERM it has no trap for: the worker
    image's stop at scale-in waited out Container Apps' grace period (30 s of a GPU replica) for SIGKILL. Run here
    as PID 1 of a PID namespace of its own, as the image runs it."""
    import secrets
    import shutil
    import signal
    import time

    import psutil

    from jobs.core.processes import free_port
    from tests.conftest import responds, wait_until

    probe = subprocess.run(["unshare", "-pf", "--mount-proc", "true"], capture_output=True, text=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip(f"this machine cannot make a PID namespace: {probe.stderr.strip()}")
    master_port, api_port, dashboard_port = free_port(), free_port(), free_port()
    env = dict(os.environ, APP_MODE=mode, EMBEDDECK_HOME=str(tmp_path), SPARK_LOCAL_IP="127.0.0.1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", _SPARK_AUTH_SECRET=secrets.token_hex(16),
               # worker: a master that is not there (it keeps dialling); trigger: its own, on loopback
               SPARK_MASTER_URL=f"spark://127.0.0.1:{master_port}", SPARK_WORKER_DIR=str(tmp_path / "work"),
               SPARK_WORKER_CORES="1", SPARK_WORKER_MEMORY="1g", SPARK_WORKER_WEBUI_PORT=str(free_port()),
               SPARK_MASTER_HOST="127.0.0.1", SPARK_MASTER_PORT=str(master_port),
               SPARK_MASTER_WEBUI_PORT=str(free_port()), EMBEDDECK_SPARK_MASTER=f"spark://127.0.0.1:{master_port}",
               API_ADDRESS="127.0.0.1", EMBEDDECK_API_PORT=str(api_port), EMBEDDECK_API_TOKEN="pid-1-test",
               DASHBOARD_ADDRESS="127.0.0.1", EMBEDDECK_DASHBOARD_PORT=str(dashboard_port))
    log = tmp_path / "entrypoint.log"
    unshare = subprocess.Popen(["unshare", "-pf", "--mount-proc", "bash", str(REPO / "docker" / "entrypoint.sh")],
                               env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        pid_1 = wait_until(lambda: next(iter(psutil.Process(unshare.pid).children()), None), timeout=30)
        if mode == "dashboard":  # the product's server, as the image starts it
            wait_until(lambda: responds(f"http://127.0.0.1:{dashboard_port}/_stcore/health"), timeout=120,
                       what="the dashboard")
        else:
            ready = "Application startup complete" if mode == "trigger" else "Starting Spark worker"
            wait_until(lambda: ready in log.read_text(errors="replace"), timeout=120, what=ready)
        stopped = time.monotonic()
        pid_1.send_signal(signal.SIGTERM)
        try:
            unshare.wait(timeout=25)
        except subprocess.TimeoutExpired:
            pytest.fail("PID 1 ignored SIGTERM for 25 s: " + log.read_text(errors="replace")[-2000:])
        assert time.monotonic() - stopped < 25
    finally:
        if unshare.poll() is None:
            os.killpg(unshare.pid, signal.SIGKILL)
            unshare.wait()


def test_private_images_state_on_local_disk_logs_and_gpu_sizes():
    """What stopped a first deployment, fixed: images pulled from a private registry with a managed identity,
    local state off the SMB share (the registry in the run's SQL database), Log Analytics for KEDA's events,
    and each GPU profile's own size."""
    apps = bodies()
    for name in ("embeddeck-controller", "embeddeck-worker"):
        body = apps[name]["body"]
        identity_id = ENV["EMBEDDECK_ACA_IDENTITY_ID"]
        assert body["identity"] == {"type": "UserAssigned", "userAssignedIdentities": {identity_id: {}}}
        assert body["properties"]["configuration"]["registries"] == [
            {"server": "embeddeck.azurecr.io", "identity": identity_id}]
        env = {e["name"]: e.get("value", e.get("secretRef")) for e in
               body["properties"]["template"]["containers"][0]["env"]}
        assert env["EMBEDDECK_HOME"] == "/home/embeddeck/state"  # not under the /data share
        assert env["EMBEDDECK_TELEMETRY_DIR"].startswith("/data/")
    controller_env = {e["name"]: e.get("value", e.get("secretRef")) for e in
                      apps["embeddeck-controller"]["body"]["properties"]["template"]["containers"][0]["env"]}
    assert controller_env["EMBEDDECK_REGISTRY_URL"] == "db-url"
    logs = apps["embeddeck-env"]["body"]["properties"]["appLogsConfiguration"]
    assert logs == {"destination": "log-analytics", "logAnalyticsConfiguration": {
        "customerId": ENV["EMBEDDECK_LOG_WORKSPACE_ID"], "sharedKey": "***"}}
    a100, _ = deploy.AcaConfig.from_env(ENV | {"EMBEDDECK_GPU_PROFILE": "Consumption-GPU-NC24-A100"})
    resources = deploy.worker_app(a100).as_dict()["properties"]["template"]["containers"][0]["resources"]
    assert (resources["cpu"], resources["memory"]) == (24.0, "220Gi")


def test_jupyter_mode_deploys_with_its_token_and_notebooks_on_the_share():
    with pytest.raises(BadRequest, match="EMBEDDECK_JUPYTER_TOKEN"):
        deploy.AcaConfig.from_env(ENV | {"EMBEDDECK_ACA_MODE": "jupyter"})
    config, _ = deploy.AcaConfig.from_env(ENV | {"EMBEDDECK_ACA_MODE": "jupyter",
                                                 "EMBEDDECK_JUPYTER_TOKEN": "Jup-0123456789abcdef0123"})
    body = deploy.masked(deploy.controller_app(config).as_dict(), config)
    container = body["properties"]["template"]["containers"][0]
    env = {e["name"]: e.get("value", e.get("secretRef")) for e in container["env"]}
    assert env["APP_MODE"] == "jupyter" and env["JUPYTER_TOKEN"] == "jupyter-token"
    assert env["EMBEDDECK_NOTEBOOK_DIR"].startswith("/data/")
    assert {"name": "jupyter-token", "value": "***"} in body["properties"]["configuration"]["secrets"]
    assert "Jup-0123456789abcdef0123" not in json.dumps(body)


def test_the_dashboard_is_deployed_only_behind_entra_id_sign_in():
    """The dashboard was published as raw TCP 8501 with no TLS and no sign-in: it is now its own app, whose
    HTTP ingress is behind Container Apps' built-in authentication, and trusts only the header it sets."""
    assert "embeddeck-dashboard" not in bodies()  # no Entra registration: no dashboard on the internet
    controller = bodies()["embeddeck-controller"]["body"]["properties"]["configuration"]["ingress"]
    assert all(not p["external"] for p in controller["additionalPortMappings"])
    env = ENV | {"EMBEDDECK_ENTRA_CLIENT_ID": "7c1f0e0a-0000-0000-0000-000000000001",
                 "EMBEDDECK_ENTRA_CLIENT_SECRET": "Entra-secret-value", "AZURE_TENANT_ID": "contoso-tenant"}
    config, _ = deploy.AcaConfig.from_env(env)
    resources = {(r["kind"], r["name"]): r["body"] for r in deploy.dry_run(config)}
    app = resources[("containerApp", "embeddeck-dashboard")]["properties"]
    assert app["configuration"]["ingress"]["external"] is True and app["configuration"]["ingress"]["targetPort"] == 8501
    assert app["configuration"]["ingress"]["transport"] == "http"  # TLS at the ingress, sign-in before Streamlit
    container_env = {e["name"]: e.get("value", e.get("secretRef")) for e in app["template"]["containers"][0]["env"]}
    assert container_env["EMBEDDECK_DASHBOARD_AUTH"] == "proxy" and container_env["EMBEDDECK_CLUSTER_BACKEND"] == "aca"
    auth = resources[("authConfig", "embeddeck-dashboard")]["properties"]
    assert auth["platform"] == {"enabled": True}
    assert auth["globalValidation"] == {"unauthenticatedClientAction": "RedirectToLoginPage",
                                        "redirectToProvider": "azureactivedirectory"}
    registration = auth["identityProviders"]["azureActiveDirectory"]["registration"]
    assert registration["openIdIssuer"] == "https://login.microsoftonline.com/contoso-tenant/v2.0"
    assert registration["clientSecretSettingName"] in {x["name"] for x in app["configuration"]["secrets"]}
    assert "Entra-secret-value" not in json.dumps(list(resources.values()))
    # Its own identity reads Azure (DefaultAzureCredential finds a system-assigned one without a client id);
    # the registry identity still pulls its image.
    identity = resources[("containerApp", "embeddeck-dashboard")]["identity"]
    assert identity["type"] == "SystemAssigned,UserAssigned"
    assert list(identity["userAssignedIdentities"]) == [ENV["EMBEDDECK_ACA_IDENTITY_ID"]]


class RecordedPrices(requests.adapters.BaseAdapter):
    """Answers like Azure's Retail Prices API (its documented page shape, split over two pages with
    NextPageLink); the prices are placeholders, not Azure's."""

    def __init__(self, pages):
        super().__init__()
        self.pages, self.sent = pages, []

    def send(self, request, **kwargs):
        self.sent.append(request)
        resp = requests.Response()
        resp.status_code, resp.request, resp.url = 200, request, request.url
        resp._content = json.dumps(self.pages[len(self.sent) - 1]).encode()
        return resp

    def close(self):
        pass


def _meter(name, price, unit="1 Second", tier=0.0):
    return {"currencyCode": "USD", "tierMinimumUnits": tier, "retailPrice": price, "unitPrice": price,
            "armRegionName": "swedencentral", "location": "SE Central", "effectiveStartDate": "2026-06-01T00:00:00Z",
            "meterName": name, "productName": "Azure Container Apps", "skuName": "Standard",
            "serviceName": "Azure Container Apps", "unitOfMeasure": unit, "type": "Consumption"}


PAGES = [{"BillingCurrency": "USD", "CustomerEntityId": "Default", "CustomerEntityType": "Retail", "Count": 2,
          "Items": [_meter("Standard vCPU Active Usage", 0.0000240), _meter("Standard T4 GPU Usage", 0.0, tier=0.0)],
          "NextPageLink": "https://prices.azure.com:443/api/retail/prices?$filter=x&$skip=100"},
         {"BillingCurrency": "USD", "Count": 2, "NextPageLink": None,
          "Items": [_meter("Standard T4 GPU Usage", 0.00032, tier=1800.0),
                    _meter("Standard A100 GPU Usage", 4.68, unit="1 Hour")]}]


def _session(pages):
    session, adapter = requests.Session(), RecordedPrices(pages)
    session.mount("https://", adapter)
    return session, adapter


def test_deploy_quotes_the_published_gpu_second_price_of_its_region_and_profile():
    session, adapter = _session(PAGES)
    config, _ = deploy.AcaConfig.from_env(ENV)
    priced = deploy.with_published_price(config, session)
    first = urlparse(adapter.sent[0].url)
    assert first.netloc == "prices.azure.com" and first.path == "/api/retail/prices"
    assert parse_qs(first.query)["$filter"] == [
        "serviceName eq 'Azure Container Apps' and armRegionName eq 'swedencentral' and priceType eq 'Consumption'"]
    assert adapter.sent[1].url == PAGES[0]["NextPageLink"]  # the next page as the API links it, as it is
    # The T4 profile's paid tier (the zero-price free tier is not a rate), per second.
    assert priced.price_per_unit_s == "0.00032" and priced.price_currency == "USD"
    assert priced.price_source.startswith("Azure retail price, swedencentral, meter 'Standard T4 GPU Usage'")
    env = {e.name: e.value for e in deploy.controller_app(priced).template.containers[0].env}
    assert env["EMBEDDECK_PRICE_PER_UNIT_S"] == "0.00032" and "Azure retail price" in env["EMBEDDECK_PRICE_SOURCE"]
    a100 = dataclasses.replace(config, gpu_profile_type="Consumption-GPU-NC24-A100")
    session, _ = _session(PAGES)
    assert float(deploy.with_published_price(a100, session).price_per_unit_s) == pytest.approx(4.68 / 3600)


def test_an_operator_price_wins_and_a_failed_lookup_deploys_without_one(capsys):
    config, _ = deploy.AcaConfig.from_env({**ENV, "EMBEDDECK_PRICE_PER_UNIT_S": "0.0004"})
    assert deploy.with_published_price(config, requests.Session()).price_source == "operator's setting"

    class Down(requests.adapters.BaseAdapter):
        def send(self, request, **kwargs):
            raise requests.ConnectionError("no route")

        def close(self):
            pass

    session = requests.Session()
    session.mount("https://", Down())
    config, _ = deploy.AcaConfig.from_env(ENV)
    unpriced = deploy.with_published_price(config, session)
    assert unpriced.price_per_unit_s is None
    assert "Retail Prices API did not answer" in capsys.readouterr().out
    env = {e.name for e in deploy.controller_app(unpriced).template.containers[0].env}
    assert "EMBEDDECK_PRICE_PER_UNIT_S" not in env
