"""Azure Container Apps deployment as code: environment, storage, controller app, GPU worker app.

`python -m cluster deploy --dry-run` prints every resource body (secrets as ***); without
--dry-run it creates or updates them with DefaultAzureCredential. Configuration comes from the
environment; what is missing is named.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import requests
from azure.mgmt.appcontainers import models as m

from cluster import prices
from jobs.core.errors import BadRequest, EmbedDeckError
from jobs.core.settings import Settings

SECRET_MASK = "***"
REQUIRED = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_LOCATION", "EMBEDDECK_ACA_SUBNET_ID",
            "EMBEDDECK_STORAGE_ACCOUNT", "EMBEDDECK_STORAGE_KEY", "EMBEDDECK_CONTROLLER_IMAGE",
            "EMBEDDECK_WORKER_IMAGE", "EMBEDDECK_API_TOKEN", "EMBEDDECK_DB_URL")
# Executors dial the driver in the controller on these fixed ports (no replica IPs needed).
DRIVER_PORT, BLOCK_MANAGER_PORT = 7078, 7079
# Local state (SQLite, the run service's socket, logs) on the replica's own disk; the share only for what
# every replica must see (worker readings). SQLite in WAL mode on SMB fails with "database is locked".
LOCAL_HOME, SHARED_TELEMETRY = "/home/embeddeck/state", "/data/embeddeck/telemetry"


@dataclass(frozen=True)
class AcaConfig:
    subscription_id: str
    resource_group: str
    location: str
    subnet_id: str
    storage_account: str
    storage_key: str
    controller_image: str
    worker_image: str
    api_token: str
    db_url: str
    environment: str = "embeddeck-env"
    controller: str = "embeddeck-controller"
    worker: str = "embeddeck-worker"
    share: str = "embeddeck"
    gpu_profile_type: str = "Consumption-GPU-NC8as-T4"
    max_workers: int = 4
    spark_secret: str = ""  # the cluster's Spark authentication secret; made per deployment when not given
    autoscale_token: str = ""  # KEDA's read-only token for GET /autoscale; made per deployment when not given
    default_domain: str = "<environment default domain>"  # read from the environment once it exists
    registry_server: str | None = None  # e.g. myacr.azurecr.io: images are pulled with identity_id
    identity_id: str | None = None  # a user-assigned managed identity with AcrPull on registry_server
    log_workspace_id: str | None = None  # Log Analytics: where scaling events and logs go
    log_workspace_key: str | None = None
    mode: str = "trigger"  # the controller's front door: trigger (the HTTP API) or jupyter
    jupyter_token: str | None = None
    dashboard: str = "embeddeck-dashboard"
    entra_client_id: str | None = None  # an Entra ID app registration: the dashboard is deployed behind it
    entra_client_secret: str | None = None
    tenant_id: str | None = None
    price_per_unit_s: str | None = None  # a GPU-second; deploy looks up the region's published rate when unset
    price_currency: str = "USD"
    price_source: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None,
                 allow_missing: bool = False) -> tuple[AcaConfig, list[str]]:
        """Config from the environment, and the names of required variables that are missing."""
        settings = Settings(env)
        mode = settings.raw("EMBEDDECK_ACA_MODE")
        if mode not in ("trigger", "jupyter"):
            raise BadRequest(f"EMBEDDECK_ACA_MODE must be trigger or jupyter, not {mode!r}")
        needed = REQUIRED + (("EMBEDDECK_JUPYTER_TOKEN",) if mode == "jupyter" else ())
        missing = [k for k in needed if not settings.raw(k)]
        if missing and not allow_missing:
            raise BadRequest("Azure deployment needs these environment variables: " + ", ".join(missing))
        get = lambda k: settings.raw(k) or f"<{k}>"  # noqa: E731
        return cls(*(get(k) for k in REQUIRED), settings.raw("EMBEDDECK_ACA_ENV"),
                   settings.raw("EMBEDDECK_ACA_CONTROLLER"), settings.raw("EMBEDDECK_ACA_WORKER"),
                   settings.raw("EMBEDDECK_SHARE"), settings.raw("EMBEDDECK_GPU_PROFILE"),
                   settings.integer("EMBEDDECK_MAX_WORKERS"),
                   settings.raw("EMBEDDECK_SPARK_SECRET") or secrets.token_hex(32),
                   settings.raw("EMBEDDECK_AUTOSCALE_TOKEN") or secrets.token_hex(24),
                   settings.raw("EMBEDDECK_ACA_DEFAULT_DOMAIN") or "<environment default domain>",
                   settings.raw("EMBEDDECK_ACR_SERVER"), settings.raw("EMBEDDECK_ACA_IDENTITY_ID"),
                   settings.raw("EMBEDDECK_LOG_WORKSPACE_ID"), settings.raw("EMBEDDECK_LOG_WORKSPACE_KEY"),
                   mode, settings.raw("EMBEDDECK_JUPYTER_TOKEN"), settings.raw("EMBEDDECK_ACA_DASHBOARD"),
                   settings.raw("EMBEDDECK_ENTRA_CLIENT_ID"), settings.raw("EMBEDDECK_ENTRA_CLIENT_SECRET"),
                   settings.raw("AZURE_TENANT_ID"), settings.raw("EMBEDDECK_PRICE_PER_UNIT_S"),
                   settings.raw("EMBEDDECK_PRICE_CURRENCY"),
                   settings.raw("EMBEDDECK_PRICE_SOURCE") or ("operator's setting" if settings.raw(
                       "EMBEDDECK_PRICE_PER_UNIT_S") else None)), missing

    @property
    def environment_id(self) -> str:
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                f"/providers/Microsoft.App/managedEnvironments/{self.environment}")


# vCPU and memory of one replica on each serverless GPU profile (the profile's whole node).
GPU_RESOURCES = {"Consumption-GPU-NC8as-T4": (8.0, "56Gi"), "Consumption-GPU-NC24-A100": (24.0, "220Gi")}


def managed_environment(c: AcaConfig) -> m.ManagedEnvironment:
    """Environment in our VNet with a CPU consumption profile and a serverless GPU profile; its logs (KEDA's
    scaling events among them) go to Log Analytics when a workspace is given."""
    logs = None
    if c.log_workspace_id:
        logs = m.AppLogsConfiguration(
            destination="log-analytics",
            log_analytics_configuration=m.LogAnalyticsConfiguration(customer_id=c.log_workspace_id,
                                                                    shared_key=c.log_workspace_key))
    return m.ManagedEnvironment(
        location=c.location,
        vnet_configuration=m.VnetConfiguration(infrastructure_subnet_id=c.subnet_id, internal=False),
        workload_profiles=[m.WorkloadProfile(name="Consumption", workload_profile_type="Consumption"),
                           m.WorkloadProfile(name="gpu", workload_profile_type=c.gpu_profile_type)],
        app_logs_configuration=logs,
    )


def _pull(c: AcaConfig) -> tuple[list[m.RegistryCredentials] | None, m.ManagedServiceIdentity | None]:
    """Private images: pulled from the registry with the user-assigned identity (AcrPull), no password."""
    if not c.registry_server:
        return None, None
    identity = m.ManagedServiceIdentity(type="UserAssigned", user_assigned_identities={c.identity_id: {}})
    return [m.RegistryCredentials(server=c.registry_server, identity=c.identity_id)], identity


def storage(c: AcaConfig) -> m.ManagedEnvironmentStorage:
    """The Azure Files share every replica mounts (telemetry, registry, logs)."""
    return m.ManagedEnvironmentStorage(properties=m.ManagedEnvironmentStorageProperties(
        azure_file=m.AzureFileProperties(account_name=c.storage_account, account_key=c.storage_key,
                                         share_name=c.share, access_mode="ReadWrite")))


def _volume(c: AcaConfig) -> tuple[list[m.Volume], list[m.VolumeMount]]:
    return ([m.Volume(name="share", storage_type="AzureFile", storage_name=c.share)],
            [m.VolumeMount(volume_name="share", mount_path="/data")])


def _internal(port: int) -> m.IngressPortMapping:
    """A TCP port other apps of the environment reach as <app>:<port>; nothing outside it."""
    return m.IngressPortMapping(external=False, target_port=port, exposed_port=port)


def _driver_env(c: AcaConfig, host: str) -> list[m.EnvironmentVar]:
    """Environment of an app whose runs have their Spark driver in it (the controller, the dashboard)."""
    var = m.EnvironmentVar
    return [var(name="EMBEDDECK_DB_URL", secret_ref="db-url"),
            # Runs are recorded in the run's own SQL database (durable, shared), never in SQLite on the SMB
            # share; local state stays on local disk, readings go to the share.
            var(name="EMBEDDECK_REGISTRY_URL", secret_ref="db-url"),
            var(name="EMBEDDECK_HOME", value=LOCAL_HOME),
            var(name="EMBEDDECK_TELEMETRY_DIR", value=SHARED_TELEMETRY),
            var(name="EMBEDDECK_SPARK_MASTER", value=f"spark://{c.controller}:7077"),
            # Executors dial the driver by the app's name on fixed ports the app exposes inside the environment.
            var(name="EMBEDDECK_DRIVER_HOST", value=host),
            var(name="EMBEDDECK_DRIVER_BIND", value="0.0.0.0"),
            var(name="EMBEDDECK_DRIVER_PORT", value=str(DRIVER_PORT)),
            var(name="EMBEDDECK_BLOCK_MANAGER_PORT", value=str(BLOCK_MANAGER_PORT)),
            # Master, driver and executors admit only holders of the cluster's secret.
            var(name="_SPARK_AUTH_SECRET", secret_ref="spark-auth"),
            # What a GPU-second costs, for the run costs the dashboard shows.
            *([var(name="EMBEDDECK_PRICE_PER_UNIT_S", value=c.price_per_unit_s),
               var(name="EMBEDDECK_PRICE_CURRENCY", value=c.price_currency),
               var(name="EMBEDDECK_PRICE_SOURCE", value=c.price_source or "")] if c.price_per_unit_s else [])]


def controller_app(c: AcaConfig) -> m.ContainerApp:
    """One CPU replica: the API or Jupyter (8888, external HTTPS); master 7077, driver ports and Spark UI
    inside the environment only."""
    volumes, mounts = _volume(c)
    registries, identity = _pull(c)
    return m.ContainerApp(
        location=c.location, managed_environment_id=c.environment_id, workload_profile_name="Consumption",
        identity=identity,
        configuration=m.Configuration(
            active_revisions_mode="Single", registries=registries,
            secrets=[m.Secret(name="api-token", value=c.api_token), m.Secret(name="db-url", value=c.db_url),
                     m.Secret(name="spark-auth", value=c.spark_secret),
                     m.Secret(name="autoscale-token", value=c.autoscale_token),
                     *([m.Secret(name="jupyter-token", value=c.jupyter_token)] if c.mode == "jupyter" else [])],
            ingress=m.Ingress(external=True, target_port=8888, transport="http", additional_port_mappings=[
                _internal(7077), _internal(DRIVER_PORT), _internal(BLOCK_MANAGER_PORT), _internal(8080)]),
        ),
        template=m.Template(
            containers=[m.Container(
                name="controller", image=c.controller_image,
                resources=m.ContainerResources(cpu=2.0, memory="4Gi"),
                env=[m.EnvironmentVar(name="APP_MODE", value=c.mode),
                     # Jupyter's token, and notebooks on the share so they outlive a revision.
                     *([m.EnvironmentVar(name="JUPYTER_TOKEN", secret_ref="jupyter-token"),
                        m.EnvironmentVar(name="EMBEDDECK_NOTEBOOK_DIR", value="/data/notebooks")]
                       if c.mode == "jupyter" else []),
                     m.EnvironmentVar(name="EMBEDDECK_API_TOKEN", secret_ref="api-token"),
                     m.EnvironmentVar(name="EMBEDDECK_AUTOSCALE_TOKEN", secret_ref="autoscale-token"),
                     *_driver_env(c, c.controller)],
                volume_mounts=mounts)],
            scale=m.Scale(min_replicas=1, max_replicas=1),
            volumes=volumes),
    )


def worker_app(c: AcaConfig) -> m.ContainerApp:
    """GPU workers, no ingress, 0..N replicas driven by the autoscaler through a KEDA metrics-api rule.

    Replica counts follow the rule, never rewritten min/max: a template change makes a new revision
    and would replace every running worker.
    """
    volumes, mounts = _volume(c)
    registries, identity = _pull(c)
    # KEDA reaches the controller's HTTP ingress at its FQDN over HTTPS (ingress serves 80/443 only; name:port
    # is for TCP ports), with a token that can read /autoscale and nothing else.
    rule = m.ScaleRule(name="embeddeck-autoscaler", custom=m.CustomScaleRule(
        type="metrics-api",
        metadata={"url": f"https://{c.controller}.internal.{c.default_domain}/autoscale", "valueLocation": "desired",
                  "targetValue": "1", "authMode": "bearer"},
        auth=[m.ScaleRuleAuth(secret_ref="autoscale-token", trigger_parameter="token")]))
    cpu, memory = GPU_RESOURCES.get(c.gpu_profile_type, (8.0, "56Gi"))
    return m.ContainerApp(
        location=c.location, managed_environment_id=c.environment_id, workload_profile_name="gpu",
        identity=identity,
        configuration=m.Configuration(active_revisions_mode="Single", registries=registries,
                                      secrets=[m.Secret(name="autoscale-token", value=c.autoscale_token),
                                               m.Secret(name="spark-auth", value=c.spark_secret)]),
        template=m.Template(
            containers=[m.Container(
                name="worker", image=c.worker_image, resources=m.ContainerResources(cpu=cpu, memory=memory),
                env=[m.EnvironmentVar(name="APP_MODE", value="worker"),
                     m.EnvironmentVar(name="SPARK_MASTER_URL", value=f"spark://{c.controller}:7077"),
                     m.EnvironmentVar(name="EMBEDDECK_HOME", value=LOCAL_HOME),
                     m.EnvironmentVar(name="EMBEDDECK_TELEMETRY_DIR", value=SHARED_TELEMETRY),
                     m.EnvironmentVar(name="_SPARK_AUTH_SECRET", secret_ref="spark-auth")],
                volume_mounts=mounts)],
            scale=m.Scale(min_replicas=0, max_replicas=c.max_workers, cooldown_period=300, polling_interval=30,
                          rules=[rule]),
            volumes=volumes),
    )


ENTRA_SECRET = "microsoft-provider-authentication-secret"


def dashboard_app(c: AcaConfig) -> m.ContainerApp:
    """The dashboard, its own app behind Container Apps' built-in authentication (Entra ID): every request
    reaches Streamlit through the sign-in, which sets X-MS-CLIENT-PRINCIPAL-NAME (the `proxy` mode trusts
    it). It drives the controller's master and the ACA backend; runs it launches have their driver here."""
    volumes, mounts = _volume(c)
    registries, pull = _pull(c)
    # Its own (system-assigned) identity reads the worker app and its metrics: DefaultAzureCredential finds it
    # without a client id, and the roles it needs are granted to it alone (docker/README.md, step 8).
    identity = m.ManagedServiceIdentity(type="SystemAssigned,UserAssigned" if pull else "SystemAssigned",
                                        user_assigned_identities=pull.user_assigned_identities if pull else None)
    return m.ContainerApp(
        location=c.location, managed_environment_id=c.environment_id, workload_profile_name="Consumption",
        identity=identity,
        configuration=m.Configuration(
            active_revisions_mode="Single", registries=registries,
            secrets=[m.Secret(name="db-url", value=c.db_url), m.Secret(name="spark-auth", value=c.spark_secret),
                     m.Secret(name=ENTRA_SECRET, value=c.entra_client_secret)],
            ingress=m.Ingress(external=True, target_port=8501, transport="http", additional_port_mappings=[
                _internal(DRIVER_PORT), _internal(BLOCK_MANAGER_PORT)]),
        ),
        template=m.Template(
            containers=[m.Container(
                name="dashboard", image=c.controller_image, resources=m.ContainerResources(cpu=1.0, memory="2Gi"),
                env=[m.EnvironmentVar(name="APP_MODE", value="dashboard"),
                     m.EnvironmentVar(name="EMBEDDECK_DASHBOARD_AUTH", value="proxy"),
                     m.EnvironmentVar(name="EMBEDDECK_CLUSTER_BACKEND", value="aca"),
                     m.EnvironmentVar(name="AZURE_SUBSCRIPTION_ID", value=c.subscription_id),
                     m.EnvironmentVar(name="AZURE_RESOURCE_GROUP", value=c.resource_group),
                     m.EnvironmentVar(name="AZURE_LOCATION", value=c.location),
                     *_driver_env(c, c.dashboard)],
                volume_mounts=mounts)],
            scale=m.Scale(min_replicas=1, max_replicas=1),
            volumes=volumes),
    )


def dashboard_auth(c: AcaConfig) -> m.AuthConfig:
    """Built-in authentication on the dashboard app: no request without an Entra ID sign-in."""
    return m.AuthConfig(
        platform=m.AuthPlatform(enabled=True),
        global_validation=m.GlobalValidation(unauthenticated_client_action="RedirectToLoginPage",
                                             redirect_to_provider="azureactivedirectory"),
        identity_providers=m.IdentityProviders(azure_active_directory=m.AzureActiveDirectory(
            enabled=True, registration=m.AzureActiveDirectoryRegistration(
                client_id=c.entra_client_id, client_secret_setting_name=ENTRA_SECRET,
                open_id_issuer=f"https://login.microsoftonline.com/{c.tenant_id}/v2.0"))))


def plan(c: AcaConfig) -> list[tuple[str, str, object]]:
    """(kind, name, body) of every resource, in creation order; the dashboard only with an Entra ID
    registration to put it behind (it is the whole control plane, and Streamlit has no sign-in)."""
    resources = [("managedEnvironment", c.environment, managed_environment(c)),
                 ("storage", c.share, storage(c)),
                 ("containerApp", c.controller, controller_app(c)),
                 ("containerApp", c.worker, worker_app(c))]
    if c.entra_client_id:
        resources += [("containerApp", c.dashboard, dashboard_app(c)), ("authConfig", c.dashboard, dashboard_auth(c))]
    return resources


def masked(body: dict, c: AcaConfig) -> dict:
    """The body with every secret value replaced by ***, for printing."""
    text = json.dumps(body)
    for secret in (c.api_token, c.db_url, c.storage_key, c.spark_secret, c.autoscale_token, c.log_workspace_key,
                   c.jupyter_token, c.entra_client_secret):
        if not secret:
            continue
        text = text.replace(json.dumps(secret)[1:-1], SECRET_MASK)
    return json.loads(text)


def dry_run(c: AcaConfig) -> list[dict]:
    """The bodies that a deployment would send, secrets masked."""
    return [{"kind": kind, "name": name, "body": masked(body.as_dict(), c)} for kind, name, body in plan(c)]


def with_published_price(c: AcaConfig, session: requests.Session | None = None) -> AcaConfig:
    """The config with the region's published GPU-second price, unless the operator set one; a lookup that
    fails is reported and the deployment goes on (costs then show GPU-seconds without an amount)."""
    if c.price_per_unit_s:
        return c
    try:
        rate = prices.gpu_rate(c.location, c.gpu_profile_type, session)
    except EmbedDeckError as exc:
        print(f"run costs without a price: {exc}")
        return c
    print(f"run costs at {rate.price_per_s:.6g} {rate.currency} per GPU-second ({rate.source})")
    return dataclasses.replace(c, price_per_unit_s=f"{rate.price_per_s:.8g}", price_currency=rate.currency,
                               price_source=rate.source)


def deploy(c: AcaConfig) -> None:
    """Create or update everything, waiting for each long-running operation."""
    from azure.identity import DefaultAzureCredential
    from azure.mgmt.appcontainers import ContainerAppsAPIClient

    c = with_published_price(c)
    client = ContainerAppsAPIClient(DefaultAzureCredential(), c.subscription_id)
    for kind, name, body in plan(c):
        if kind == "managedEnvironment":
            created = client.managed_environments.begin_create_or_update(c.resource_group, name, body).result()
            # KEDA's URL names the environment's default domain, known only once the environment exists.
            c = dataclasses.replace(c, default_domain=created.default_domain)
        elif kind == "storage":
            client.managed_environments_storages.create_or_update(c.resource_group, c.environment, name, body)
        elif kind == "authConfig":
            client.container_apps_auth_configs.create_or_update(c.resource_group, name, "current", body)
        else:
            body = {c.controller: controller_app, c.worker: worker_app, c.dashboard: dashboard_app}[name](c)
            client.container_apps.begin_create_or_update(c.resource_group, name, body).result()
        print(f"{kind} {name}: done")
