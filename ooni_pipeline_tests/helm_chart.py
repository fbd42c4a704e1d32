"""What Dagster's Helm chart (``dagster/dagster`` 1.13.27) renders from a values file, for
the parts this project sets: the instance ``dagster.yaml`` of its ConfigMap, the command
and container context of a user-code deployment.

Neither helm nor a cluster runs here, so the tests render those parts in Python, after
the chart's own templates (``helm/dagster/templates/configmap-instance.yaml`` and
``helpers/instance/_*.tpl``; ``charts/dagster-user-deployments/templates/
deployment-user.yaml`` and its ``k8sContainerContext`` helper), and hand the result to
Dagster's own config validation. Each section accepts exactly the keys of the chart's
values schema (``helm/dagster/schema``): a misspelled key is an error here, where helm
would drop it silently wherever that schema allows extra keys. Sections this project
leaves to the chart's defaults are not rendered.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

CHART_VERSION = "1.13.27"
DEFAULT_DAGSTER_HOME = "/opt/dagster/dagster_home"

# Keys of the chart's values schema, per section.
TOP_LEVEL_KEYS = {
    "global",
    "dagsterWebserver",
    "dagster-user-deployments",
    "postgresql",
    "generatePostgresqlPasswordSecret",
    "generateCeleryConfigSecret",
    "rabbitmq",
    "redis",
    "flower",
    "ingress",
    "imagePullSecrets",
    "computeLogManager",
    "scheduler",
    "runLauncher",
    "pythonLogs",
    "dagsterDaemon",
    "busybox",
    "migrate",
    "telemetry",
    "serviceAccount",
    "retention",
    "additionalInstanceConfig",
    "concurrency",
}
GLOBAL_KEYS = {
    "postgresqlSecretName",
    "dagsterHome",
    "serviceAccountName",
    "celeryConfigSecretName",
    "dagsterInstanceConfigMap",
}
POSTGRESQL_KEYS = {
    "image",
    "enabled",
    "postgresqlHost",
    "postgresqlUsername",
    "postgresqlPassword",
    "postgresqlDatabase",
    "postgresqlParams",
    "postgresqlScheme",
    "service",
}
K8S_RUN_LAUNCHER_KEYS = {
    "image",
    "imagePullPolicy",
    "jobNamespace",
    "loadInclusterConfig",
    "kubeconfigFile",
    "envConfigMaps",
    "envSecrets",
    "envVars",
    "volumeMounts",
    "volumes",
    "labels",
    "failPodOnRunFailure",
    "resources",
    "schedulerName",
    "securityContext",
    "runK8sConfig",
}
RUN_K8S_CONFIG_KEYS = {
    "containerConfig": "container_config",
    "podSpecConfig": "pod_spec_config",
    "podTemplateSpecMetadata": "pod_template_spec_metadata",
    "jobSpecConfig": "job_spec_config",
    "jobMetadata": "job_metadata",
}
S3_COMPUTE_LOG_MANAGER_KEYS = {
    "bucket",
    "localDir",
    "prefix",
    "useSsl",
    "verify",
    "verifyCertPath",
    "endpointUrl",
    "skipEmptyFiles",
    "uploadInterval",
    "uploadExtraArgs",
    "showUrlOnly",
    "region",
}
DAEMON_KEYS = {
    "enabled",
    "image",
    "runCoordinator",
    "heartbeatTolerance",
    "env",
    "envConfigMaps",
    "envSecrets",
    "deploymentLabels",
    "labels",
    "nodeSelector",
    "affinity",
    "tolerations",
    "podSecurityContext",
    "securityContext",
    "resources",
    "checkDbReadyInitContainer",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "annotations",
    "runMonitoring",
    "runRetries",
    "sensors",
    "schedules",
    "backfills",
    "schedulerName",
    "logFormat",
    "volumeMounts",
    "volumes",
    "initContainerResources",
    "extraContainers",
    "extraPrependedInitContainers",
}
QUEUED_RUN_COORDINATOR_KEYS = {
    "maxConcurrentRuns",
    "tagConcurrencyLimits",
    "dequeueIntervalSeconds",
    "dequeueNumWorkers",
    "dequeueUseThreads",
    "blockOpConcurrencyLimitedRuns",
}
RUN_MONITORING_KEYS = {
    "enabled",
    "startTimeoutSeconds",
    "cancelTimeoutSeconds",
    "maxRuntimeSeconds",
    "maxResumeRunAttempts",
    "pollIntervalSeconds",
    "freeSlotsAfterRunEndSeconds",
}
RUN_RETRIES_KEYS = {"enabled", "maxRetries", "retryOnAssetOrOpFailure"}
RETENTION_KEYS = {"enabled", "sensor", "schedule", "autoMaterialize"}
TICK_RETENTION_BY_TYPE_KEYS = {"skipped", "success", "failure", "started"}
CONCURRENCY_KEYS = {"enabled", "pools", "runs"}
CONCURRENCY_POOLS_KEYS = {"defaultLimit", "granularity", "opGranularityRunBuffer"}
CONCURRENCY_RUNS_KEYS = {"maxConcurrentRuns", "tagConcurrencyLimits"}
USER_DEPLOYMENTS_KEYS = {"enabled", "enableSubchart", "imagePullSecrets", "deployments"}
USER_DEPLOYMENT_KEYS = {
    "name",
    "image",
    "dagsterApiGrpcArgs",
    "codeServerArgs",
    "includeConfigInLaunchedRuns",
    "deploymentNamespace",
    "port",
    "env",
    "envConfigMaps",
    "envSecrets",
    "annotations",
    "nodeSelector",
    "affinity",
    "tolerations",
    "podSecurityContext",
    "securityContext",
    "resources",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "labels",
    "volumeMounts",
    "volumes",
    "schedulerName",
    "initContainers",
    "sidecarContainers",
    "deploymentStrategy",
}
WEBSERVER_KEYS = {
    "dbStatementTimeout",
    "dbPoolRecycle",
    "logLevel",
    "schedulerName",
    "volumeMounts",
    "volumes",
    "pathPrefix",
    "replicaCount",
    "image",
    "nameOverride",
    "service",
    "workspace",
    "env",
    "envConfigMaps",
    "envSecrets",
    "deploymentLabels",
    "labels",
    "nodeSelector",
    "affinity",
    "tolerations",
    "podSecurityContext",
    "securityContext",
    "resources",
    "readinessProbe",
    "livenessProbe",
    "startupProbe",
    "annotations",
    "enableReadOnly",
}


class ChartValuesError(ValueError):
    """A value the chart's schema refuses, or one its templates cannot render."""


def load_values(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise ChartValuesError(f"{path}: not a mapping")
    return values


def _keys(section: Mapping[str, Any], allowed: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(section, Mapping):
        raise ChartValuesError(f"{where}: expected a mapping, got {section!r}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ChartValuesError(f"{where}: unknown key(s) {unknown} (the chart has no such value)")
    return section


def _required(section: Mapping[str, Any], key: str, where: str) -> Any:
    """A value the template prints unconditionally: missing, it would render as
    ``<no value>``."""
    if section.get(key) is None:
        raise ChartValuesError(f"{where}.{key} must be set")
    return section[key]


def check_values(values: Mapping[str, Any]) -> None:
    """Every key of the sections set here is a key of the chart's schema."""
    _keys(values, TOP_LEVEL_KEYS, "(top level)")
    _keys(values.get("global", {}), GLOBAL_KEYS, "global")
    _keys(values.get("postgresql", {}), POSTGRESQL_KEYS, "postgresql")
    _keys(values.get("dagsterDaemon", {}), DAEMON_KEYS, "dagsterDaemon")
    _keys(values.get("dagsterWebserver", {}), WEBSERVER_KEYS, "dagsterWebserver")
    user = _keys(
        values.get("dagster-user-deployments", {}),
        USER_DEPLOYMENTS_KEYS,
        "dagster-user-deployments",
    )
    for i, deployment in enumerate(user.get("deployments", [])):
        _keys(deployment, USER_DEPLOYMENT_KEYS, f"dagster-user-deployments.deployments[{i}]")


def fullname(release: str) -> str:
    """``dagster.fullname`` for a release whose name does not contain the chart's."""
    return release if "dagster" in release else f"{release}-dagster"


def _names(refs: list[Mapping[str, Any]]) -> list[str]:
    """The chart's ``range ... if hasKey $x "name"`` over ConfigMap/Secret references."""
    return [ref["name"] for ref in refs if "name" in ref]


def _postgres(values: Mapping[str, Any], release: str) -> dict[str, Any]:
    """``dagsterYaml.postgresql.config`` (helpers/instance/_postgresql.tpl)."""
    pg = _keys(values["postgresql"], POSTGRESQL_KEYS, "postgresql")
    host = pg.get("postgresqlHost") if not pg.get("enabled") else f"{fullname(release)}-postgresql"
    config: dict[str, Any] = {
        "username": _required(pg, "postgresqlUsername", "postgresql"),
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": host,
        "db_name": _required(pg, "postgresqlDatabase", "postgresql"),
        "port": _required(pg.get("service", {}), "port", "postgresql.service"),
        "params": pg.get("postgresqlParams") or {},
    }
    if pg.get("postgresqlScheme"):
        config["scheme"] = pg["postgresqlScheme"]
    return {"postgres_db": config}


def _run_launcher(values: Mapping[str, Any], release: str, namespace: str) -> dict[str, Any]:
    """``dagsterYaml.runLauncher.k8s`` (helpers/instance/_run-launcher.tpl)."""
    launcher = values["runLauncher"]
    if launcher.get("type") != "K8sRunLauncher":
        raise ChartValuesError(f"runLauncher.type: {launcher.get('type')!r} is not rendered here")
    k8s = _keys(
        launcher["config"]["k8sRunLauncher"],
        K8S_RUN_LAUNCHER_KEYS,
        "runLauncher.config.k8sRunLauncher",
    )
    glob = values.get("global", {})
    config: dict[str, Any] = {
        "load_incluster_config": _required(
            k8s, "loadInclusterConfig", "runLauncher.config.k8sRunLauncher"
        ),
        "job_namespace": k8s.get("jobNamespace") or namespace,
        "image_pull_policy": _required(k8s, "imagePullPolicy", "runLauncher.config.k8sRunLauncher"),
        "service_account_name": glob.get("serviceAccountName")
        or values.get("serviceAccount", {}).get("name")
        or fullname(release),
        "dagster_home": glob.get("dagsterHome") or DEFAULT_DAGSTER_HOME,
        "instance_config_map": f"{fullname(release)}-instance",
        "postgres_password_secret": glob.get("postgresqlSecretName")
        or f"{fullname(release)}-postgresql-secret",
    }
    if k8s.get("kubeconfigFile"):
        config["kubeconfig_file"] = k8s["kubeconfigFile"]
    if values.get("imagePullSecrets"):
        config["image_pull_secrets"] = values["imagePullSecrets"]
    if "image" in k8s:
        image = k8s["image"]
        config["job_image"] = f"{image['repository']}:{image['tag']}"
    if k8s.get("envConfigMaps"):
        config["env_config_maps"] = _names(k8s["envConfigMaps"])
    if k8s.get("envSecrets"):
        config["env_secrets"] = _names(k8s["envSecrets"])
    plain = {
        "envVars": "env_vars",
        "volumeMounts": "volume_mounts",
        "volumes": "volumes",
        "labels": "labels",
        "resources": "resources",
        "schedulerName": "scheduler_name",
        "securityContext": "security_context",
    }
    for key, name in plain.items():
        if k8s.get(key):
            config[name] = k8s[key]
    if k8s.get("failPodOnRunFailure"):
        config["fail_pod_on_run_failure"] = True
    if k8s.get("runK8sConfig"):
        run_k8s = _keys(
            k8s["runK8sConfig"],
            set(RUN_K8S_CONFIG_KEYS),
            "runLauncher.config.k8sRunLauncher.runK8sConfig",
        )
        config["run_k8s_config"] = {
            RUN_K8S_CONFIG_KEYS[key]: value for key, value in run_k8s.items() if value
        }
    return {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": config}


def _run_coordinator(values: Mapping[str, Any]) -> dict[str, Any]:
    """``dagsterYaml.runCoordinator.queued`` (helpers/instance/_run-coordinator.tpl)."""
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    if coordinator.get("type") != "QueuedRunCoordinator":
        raise ChartValuesError(f"runCoordinator.type {coordinator.get('type')!r} not rendered")
    queued = _keys(
        coordinator.get("config", {}).get("queuedRunCoordinator", {}),
        QUEUED_RUN_COORDINATOR_KEYS,
        "dagsterDaemon.runCoordinator.config.queuedRunCoordinator",
    )
    rendered: dict[str, Any] = {
        "module": "dagster.core.run_coordinator",
        "class": "QueuedRunCoordinator",
    }
    present = {key: value for key, value in queued.items() if value not in (None, False, [], {})}
    if not present:
        return rendered
    concurrency_enabled = bool(values.get("concurrency", {}).get("enabled"))
    config: dict[str, Any] = {}
    if queued.get("maxConcurrentRuns") is not None:
        config["max_concurrent_runs"] = queued["maxConcurrentRuns"]
    elif not concurrency_enabled:
        config["max_concurrent_runs"] = -1
    if queued.get("tagConcurrencyLimits"):
        config["tag_concurrency_limits"] = queued["tagConcurrencyLimits"]
    simple = {
        "dequeueIntervalSeconds": "dequeue_interval_seconds",
        "dequeueUseThreads": "dequeue_use_threads",
        "dequeueNumWorkers": "dequeue_num_workers",
    }
    for key, name in simple.items():
        if queued.get(key):
            config[name] = queued[key]
    block = queued.get("blockOpConcurrencyLimitedRuns")
    if block:
        config["block_op_concurrency_limited_runs"] = {
            "enabled": block["enabled"],
            "op_concurrency_slot_buffer": block["opConcurrencySlotBuffer"],
        }
    rendered["config"] = config
    return rendered


def _compute_logs(values: Mapping[str, Any]) -> dict[str, Any]:
    """``dagsterYaml.computeLogManager.s3`` (helpers/instance/_compute-log-manager.tpl)."""
    manager = values["computeLogManager"]
    if manager.get("type") != "S3ComputeLogManager":
        raise ChartValuesError(f"computeLogManager.type {manager.get('type')!r} not rendered")
    s3 = _keys(
        manager["config"]["s3ComputeLogManager"],
        S3_COMPUTE_LOG_MANAGER_KEYS,
        "computeLogManager.config.s3ComputeLogManager",
    )
    config: dict[str, Any] = {"bucket": s3.get("bucket")}
    optional = {
        "localDir": "local_dir",
        "prefix": "prefix",
        "useSsl": "use_ssl",
        "verifyCertPath": "verify_cert_path",
        "endpointUrl": "endpoint_url",
        "skipEmptyFiles": "skip_empty_files",
        "uploadInterval": "upload_interval",
        "uploadExtraArgs": "upload_extra_args",
        "showUrlOnly": "show_url_only",
        "region": "region",
    }
    for key, name in optional.items():
        if s3.get(key):
            config[name] = s3[key]
    config["verify"] = s3.get("verify") is not False
    return {
        "module": "dagster_aws.s3.compute_log_manager",
        "class": "S3ComputeLogManager",
        "config": config,
    }


def _run_monitoring(daemon: Mapping[str, Any]) -> dict[str, Any] | None:
    monitoring = _keys(
        daemon.get("runMonitoring", {}), RUN_MONITORING_KEYS, "dagsterDaemon.runMonitoring"
    )
    if not (daemon.get("enabled") and monitoring.get("enabled")):
        return None
    where = "dagsterDaemon.runMonitoring"
    rendered = {
        "enabled": monitoring["enabled"],
        "start_timeout_seconds": _required(monitoring, "startTimeoutSeconds", where),
        "poll_interval_seconds": _required(monitoring, "pollIntervalSeconds", where),
        "free_slots_after_run_end_seconds": _required(
            monitoring, "freeSlotsAfterRunEndSeconds", where
        ),
    }
    for key, name in {
        "cancelTimeoutSeconds": "cancel_timeout_seconds",
        "maxRuntimeSeconds": "max_runtime_seconds",
        "maxResumeRunAttempts": "max_resume_run_attempts",
    }.items():
        if monitoring.get(key) is not None:
            rendered[name] = monitoring[key]
    return rendered


def _run_retries(daemon: Mapping[str, Any]) -> dict[str, Any] | None:
    retries = _keys(daemon.get("runRetries", {}), RUN_RETRIES_KEYS, "dagsterDaemon.runRetries")
    if not (daemon.get("enabled") and retries.get("enabled")):
        return None
    rendered: dict[str, Any] = {"enabled": True}
    if retries.get("maxRetries"):
        rendered["max_retries"] = retries["maxRetries"]
    if "retryOnAssetOrOpFailure" in retries:
        rendered["retry_on_asset_or_op_failure"] = retries["retryOnAssetOrOpFailure"]
    return rendered


def _retention(values: Mapping[str, Any]) -> dict[str, Any] | None:
    retention = _keys(values.get("retention", {}), RETENTION_KEYS, "retention")
    if not retention.get("enabled"):
        return None
    rendered = {}
    for key, name in {
        "sensor": "sensor",
        "schedule": "schedule",
        "autoMaterialize": "auto_materialize",
    }.items():
        if not retention.get(key):
            continue
        purge = _required(retention[key], "purgeAfterDays", f"retention.{key}")
        if isinstance(purge, Mapping):
            where = f"retention.{key}.purgeAfterDays"
            _keys(purge, TICK_RETENTION_BY_TYPE_KEYS, where)
            for status in sorted(TICK_RETENTION_BY_TYPE_KEYS):
                _required(purge, status, where)  # all four are required by the schema
        rendered[name] = {"purge_after_days": purge}
    return rendered


def _concurrency(values: Mapping[str, Any]) -> dict[str, Any] | None:
    """``dagsterYaml.concurrency`` (helpers/instance/_concurrency.tpl), with its checks
    against the queued run coordinator's own limits."""
    concurrency = _keys(values.get("concurrency", {}), CONCURRENCY_KEYS, "concurrency")
    if not concurrency.get("enabled"):
        return None
    pools = _keys(concurrency.get("pools", {}), CONCURRENCY_POOLS_KEYS, "concurrency.pools")
    runs = _keys(concurrency.get("runs", {}), CONCURRENCY_RUNS_KEYS, "concurrency.runs")
    coordinator = values.get("dagsterDaemon", {}).get("runCoordinator", {})
    if coordinator.get("enabled") and coordinator.get("type") == "QueuedRunCoordinator":
        queued = coordinator.get("config", {}).get("queuedRunCoordinator", {})
        if (
            runs.get("maxConcurrentRuns") is not None
            and queued.get("maxConcurrentRuns") is not None
        ):
            raise ChartValuesError(
                "Cannot set both concurrency.runs.maxConcurrentRuns and "
                "dagsterDaemon.runCoordinator.config.queuedRunCoordinator.maxConcurrentRuns"
            )
        if runs.get("tagConcurrencyLimits") and queued.get("tagConcurrencyLimits"):
            raise ChartValuesError(
                "Cannot set both concurrency.runs.tagConcurrencyLimits and "
                "dagsterDaemon.runCoordinator.config.queuedRunCoordinator.tagConcurrencyLimits"
            )
    rendered: dict[str, Any] = {}
    rendered_pools = {}
    if pools.get("defaultLimit") is not None:
        rendered_pools["default_limit"] = pools["defaultLimit"]
    if pools.get("granularity"):
        rendered_pools["granularity"] = pools["granularity"]
    if pools.get("opGranularityRunBuffer") is not None:
        rendered_pools["op_granularity_run_buffer"] = pools["opGranularityRunBuffer"]
    if rendered_pools:
        rendered["pools"] = rendered_pools
    rendered_runs: dict[str, Any] = {}
    if runs.get("maxConcurrentRuns") is not None:
        rendered_runs["max_concurrent_runs"] = runs["maxConcurrentRuns"]
    if runs.get("tagConcurrencyLimits"):
        rendered_runs["tag_concurrency_limits"] = [
            {key: limit[key] for key in ("key", "value", "limit") if limit.get(key) is not None}
            for limit in runs["tagConcurrencyLimits"]
        ]
    if rendered_runs:
        rendered["runs"] = rendered_runs
    return rendered


def render_instance(
    values: Mapping[str, Any], release: str = "ooni", namespace: str = "dagster"
) -> dict[str, Any]:
    """The ``dagster.yaml`` of the chart's instance ConfigMap."""
    check_values(values)
    storage = _postgres(values, release)
    instance: dict[str, Any] = {
        "scheduler": {"module": "dagster.core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": {
            "module": "dagster_postgres.schedule_storage",
            "class": "PostgresScheduleStorage",
            "config": storage,
        },
        "run_launcher": _run_launcher(values, release, namespace),
        "run_storage": {
            "module": "dagster_postgres.run_storage",
            "class": "PostgresRunStorage",
            "config": storage,
        },
        "event_log_storage": {
            "module": "dagster_postgres.event_log",
            "class": "PostgresEventLogStorage",
            "config": storage,
        },
    }
    daemon = values.get("dagsterDaemon", {})
    if daemon.get("enabled") and daemon.get("runCoordinator", {}).get("enabled"):
        instance["run_coordinator"] = _run_coordinator(values)
    instance["compute_logs"] = _compute_logs(values)
    sections = {
        "run_monitoring": _run_monitoring(daemon),
        "run_retries": _run_retries(daemon),
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
        "retention": _retention(values),
        "concurrency": _concurrency(values),
    }
    instance.update({name: value for name, value in sections.items() if value is not None})
    for name, value in (values.get("additionalInstanceConfig") or {}).items():
        if name in instance:
            raise ChartValuesError(f"additionalInstanceConfig.{name} repeats a rendered key")
        instance[name] = value
    return instance


def user_deployments(values: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    section = values.get("dagster-user-deployments", {})
    if not (section.get("enabled") and section.get("enableSubchart")):
        return []
    return list(section.get("deployments", []))


def container_args(deployment: Mapping[str, Any]) -> list[str]:
    """The code server container's ``args`` (deployment-user.yaml): the chart sets no
    ``command``, so the image must run these as they are."""
    if deployment.get("dagsterApiGrpcArgs"):
        return [
            "dagster",
            "api",
            "grpc",
            "-h",
            "0.0.0.0",
            "-p",
            str(deployment["port"]),
            *deployment["dagsterApiGrpcArgs"],
        ]
    if deployment.get("codeServerArgs"):
        return [
            "dagster",
            "code-server",
            "start",
            "-h",
            "0.0.0.0",
            "-p",
            str(deployment["port"]),
            *deployment["codeServerArgs"],
        ]
    raise ChartValuesError(f"deployment {deployment.get('name')}: no dagsterApiGrpcArgs")


def container_context(
    values: Mapping[str, Any],
    deployment: Mapping[str, Any],
    release: str = "ooni",
    namespace: str = "dagster",
) -> dict[str, Any] | None:
    """The container context the code server reports to the run launcher
    (``dagsterUserDeployments.k8sContainerContext``), or ``None`` when
    ``includeConfigInLaunchedRuns`` is off."""
    include = deployment.get("includeConfigInLaunchedRuns") or {"enabled": True}
    if not include.get("enabled"):
        return None
    k8s: dict[str, Any] = {
        "image_pull_policy": deployment["image"]["pullPolicy"],
        "env_config_maps": [
            f"{fullname(release)}-{deployment['name']}-user-env",
            *_names(deployment.get("envConfigMaps") or []),
        ],
    }
    if values.get("imagePullSecrets"):
        k8s["image_pull_secrets"] = values["imagePullSecrets"]
    if deployment.get("envSecrets"):
        k8s["env_secrets"] = _names(deployment["envSecrets"])
    for key, name in {
        "volumeMounts": "volume_mounts",
        "volumes": "volumes",
        "labels": "labels",
        "resources": "resources",
        "schedulerName": "scheduler_name",
    }.items():
        if deployment.get(key):
            k8s[name] = deployment[key]
    k8s["namespace"] = namespace
    glob = values.get("global", {})
    section = values.get("dagster-user-deployments", {})
    k8s["service_account_name"] = (
        glob.get("serviceAccountName")
        or section.get("serviceAccount", {}).get("name")
        or f"{fullname(release)}-user-deployments"
    )
    if isinstance(deployment.get("env"), list):
        k8s["env"] = deployment["env"]
    pod_spec: dict[str, Any] = {"automount_service_account_token": True}
    if deployment.get("sidecarContainers"):
        pod_spec["containers"] = deployment["sidecarContainers"]
    if deployment.get("initContainers"):
        pod_spec["init_containers"] = deployment["initContainers"]
    run_k8s_config: dict[str, Any] = {"pod_spec_config": pod_spec}
    if deployment.get("annotations"):
        run_k8s_config["pod_template_spec_metadata"] = {"annotations": deployment["annotations"]}
    k8s["run_k8s_config"] = run_k8s_config
    return {"k8s": k8s}


def code_server_env(
    values: Mapping[str, Any], deployment: Mapping[str, Any], release: str = "ooni"
) -> dict[str, str]:
    """The plain environment the chart gives the code server: the shared ConfigMap, the
    deployment's ``env`` map (its own ConfigMap). Secrets come from Kubernetes."""
    glob = values.get("global", {})
    env = {
        "DAGSTER_HOME": glob.get("dagsterHome") or DEFAULT_DAGSTER_HOME,
        "DAGSTER_K8S_PIPELINE_RUN_NAMESPACE": "dagster",
        "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP": f"{fullname(release)}-pipeline-env",
    }
    if isinstance(deployment.get("env"), Mapping):
        env.update({str(k): str(v) for k, v in deployment["env"].items()})
    return env
