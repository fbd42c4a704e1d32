"""deploy/kubernetes: the Helm values, the image recipe, and what they make of a run.

No helm, cluster or image build runs here. The instance ``dagster.yaml`` the chart would
render from deploy/kubernetes/values.yaml (``helm_chart.render_instance``) is validated
by Dagster's own instance loader and by the config schemas of the classes it names; the
code server is started with the very command and environment the chart gives it, and
answers the chart's health check; the Kubernetes Job of a run is built by dagster-k8s's
own code from what that server reports, as the run launcher builds it before sending it
to the cluster.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import (
    dagster_instance_config,
    get_default_tick_retention_settings,
    get_tick_retention_settings,
)
from dagster._serdes.config_class import class_from_code_pointer, convert_dagster_submodule_name

from ooni_pipeline_tests.helm_chart import (
    CHART_VERSION,
    ChartValuesError,
    code_server_env,
    container_args,
    container_context,
    load_values,
    render_instance,
    user_deployments,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "deploy" / "kubernetes"
VALUES = K8S_DIR / "values.yaml"
DOCKERFILE = K8S_DIR / "Dockerfile"
PRODUCTION_YAML = REPO_ROOT / "deploy" / "dagster.production.yaml"
BIN = Path(sys.executable).parent
IMAGE = "registry.example.org/ooni/ooni-pipeline:0.1.0"
# Extras that stay out of the image, and why: test tooling only.
NOT_IN_IMAGE = {"test"}
# What the code reads as secrets (docs/operations.md): only ever from a Secret.
SECRET_VARIABLES = {
    "OONI_CLICKHOUSE_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "OONI_ALERT_WEBHOOK_URL",
    "DAGSTER_PG_PASSWORD",
}


@pytest.fixture(autouse=True)
def _postgres_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Dagster pod has DAGSTER_PG_PASSWORD, from the chart's Postgres Secret; the
    storage config resolves it."""
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "not-a-real-password")


def _values() -> dict[str, Any]:
    return load_values(VALUES)


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def _validated_instance(values: dict[str, Any], home: Path) -> dict[str, Any]:
    """The rendered instance through Dagster's loader (schema, storage and concurrency
    rules), then each configurable class's own config schema."""
    rendered = render_instance(values)
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(rendered, sort_keys=False))
    config, _ = dagster_instance_config(str(home))
    for section in (
        "scheduler",
        "run_launcher",
        "run_coordinator",
        "compute_logs",
        "run_storage",
        "event_log_storage",
        "schedule_storage",
    ):
        data = config[section]
        klass = class_from_code_pointer(
            convert_dagster_submodule_name(data["module"], "private"), data["class"]
        )
        if not hasattr(klass, "config_type"):
            continue
        result = process_config(
            resolve_to_config_type(klass.config_type()), data.get("config") or {}
        )
        assert result.success, (section, [e.message for e in result.errors])
    return config


def test_the_chart_version_is_the_pinned_dagster_release() -> None:
    """The chart is versioned with dagster: the one the docs install is the one pinned."""
    dagster = importlib.metadata.version("dagster")
    assert CHART_VERSION == dagster
    assert f"dagster=={dagster}" in _pyproject()["dependencies"]
    assert f"`dagster/dagster` version {dagster}" in VALUES.read_text()
    operations = (REPO_ROOT / "docs" / "operations.md").read_text()
    versions = re.findall(r"helm upgrade --install .*--version (\S+)", operations)
    assert versions and set(versions) == {dagster}, versions


def test_dagster_k8s_is_pinned_with_the_dagster_family() -> None:
    """The run launcher's library is in the production extra, at the release made with
    the pinned dagster (as dagster-postgres)."""
    production = _pyproject()["optional-dependencies"]["production"]
    (pin,) = [r for r in production if r.startswith("dagster-k8s")]
    assert pin == f"dagster-k8s=={importlib.metadata.version('dagster-k8s')}"
    dagster = importlib.metadata.version("dagster")
    assert f"dagster=={dagster}" in (importlib.metadata.requires("dagster-k8s") or [])


def test_the_rendered_instance_is_valid_and_mirrors_the_production_instance(tmp_path) -> None:
    """What the chart renders passes Dagster's instance loader and each class's config
    schema, and keeps deploy/dagster.production.yaml's limits: run queue, the
    `clickhouse` pool, run monitoring, retention, telemetry, freshness."""
    config = _validated_instance(_values(), tmp_path / "home")
    production = yaml.safe_load(PRODUCTION_YAML.read_text())
    for section in ("concurrency", "run_monitoring", "telemetry", "freshness"):
        assert config[section] == production[section], section
    # the chart's schema wants every tick status; the same retention, status by status
    for kind in (InstigatorType.SCHEDULE, InstigatorType.SENSOR):
        default = get_default_tick_retention_settings(kind)
        key = kind.value.lower()
        assert get_tick_retention_settings(config["retention"][key], default) == (
            get_tick_retention_settings(production["retention"][key], default)
        ), key
    assert "run_retries" not in config and "run_retries" not in production
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    assert config["compute_logs"]["class"] == "S3ComputeLogManager"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    # the run queue's limit is the concurrency block's alone (the chart refuses both)
    assert "config" not in config["run_coordinator"]
    postgres = config["run_storage"]["config"]["postgres_db"]
    assert postgres["password"] == {"env": "DAGSTER_PG_PASSWORD"}


def test_the_compute_log_manager_is_built_from_the_rendered_config(tmp_path) -> None:
    """dagster-aws builds the S3 compute log manager from it (no request is sent)."""
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager

    data = _validated_instance(_values(), tmp_path / "home")["compute_logs"]
    result = process_config(
        resolve_to_config_type(S3ComputeLogManager.config_type()), data["config"]
    )
    manager = S3ComputeLogManager(**result.value)
    s3 = _values()["computeLogManager"]["config"]["s3ComputeLogManager"]
    assert manager._s3_bucket == s3["bucket"] and manager._s3_prefix == s3["prefix"]


def _parent(values: dict[str, Any], path: str) -> tuple[Any, str]:
    """The node holding ``path`` (dotted, list indexes as numbers) and its last key."""
    *parents, leaf = path.split(".")
    node: Any = values
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, leaf


def _set(values: dict[str, Any], path: str, value: Any) -> None:
    node, leaf = _parent(values, path)
    node[leaf] = value


def _rename(values: dict[str, Any], path: str, new: str) -> None:
    node, leaf = _parent(values, path)
    node[new] = node.pop(leaf)


# A plausible mistake in the values, and what the failure says.
MISTAKES = {
    "a misspelled run launcher key": (
        lambda v: _rename(v, "runLauncher.config.k8sRunLauncher.resources", "resource"),
        "unknown key(s) ['resource']",
    ),
    "a misspelled compute log key": (
        lambda v: _rename(v, "computeLogManager.config.s3ComputeLogManager.bucket", "bucketName"),
        "unknown key(s) ['bucketName']",
    ),
    "no compute log bucket": (
        lambda v: v["computeLogManager"]["config"]["s3ComputeLogManager"].pop("bucket"),
        "root:bucket must not be None",
    ),
    "a misspelled top-level section": (
        lambda v: _rename(v, "concurrency", "concurrencies"),
        "unknown key(s) ['concurrencies']",
    ),
    "a misspelled pool limit": (
        lambda v: _rename(v, "concurrency.pools.defaultLimit", "limit"),
        "unknown key(s) ['limit']",
    ),
    "a run limit set twice": (
        lambda v: _set(
            v,
            "dagsterDaemon.runCoordinator.config",
            {"queuedRunCoordinator": {"maxConcurrentRuns": 8}},
        ),
        "Cannot set both concurrency.runs.maxConcurrentRuns",
    ),
    "a word for a number": (
        lambda v: _set(v, "dagsterDaemon.runMonitoring.pollIntervalSeconds", "sixty"),
        "Invalid scalar at path root:run_monitoring:poll_interval_seconds",
    ),
    "a missing monitoring value": (
        lambda v: v["dagsterDaemon"]["runMonitoring"].pop("freeSlotsAfterRunEndSeconds"),
        "freeSlotsAfterRunEndSeconds must be set",
    ),
    "a wrong pool granularity": (
        lambda v: _set(v, "concurrency.pools.granularity", "step"),
        "Found value `step` for `granularity`",
    ),
    "a run launcher value of the wrong type": (
        lambda v: _set(v, "runLauncher.config.k8sRunLauncher.envVars", "OONI_S3_BUCKET=x"),
        "root:env_vars must be list",
    ),
    "a misspelled instance key": (
        lambda v: _set(v, "additionalInstanceConfig", {"freshnes": {"enabled": True}}),
        'unexpected config entry "freshnes"',
    ),
    "a misspelled user deployment key": (
        lambda v: _rename(v, "dagster-user-deployments.deployments.0.envSecrets", "envSecret"),
        "unknown key(s) ['envSecret']",
    ),
    "retention missing a tick status": (
        lambda v: v["retention"]["sensor"]["purgeAfterDays"].pop("started"),
        "purgeAfterDays.started must be set",
    ),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_plausible_mistake_in_the_values_fails_validation(mistake: str, tmp_path) -> None:
    mutate, message = MISTAKES[mistake]
    values = copy.deepcopy(_values())
    mutate(values)
    with pytest.raises((ChartValuesError, AssertionError, DagsterInvalidConfigError)) as raised:
        _validated_instance(values, tmp_path / "home")
    assert message in str(raised.value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deployment() -> dict[str, Any]:
    (deployment,) = user_deployments(_values())
    return deployment


@pytest.fixture(scope="module")
def code_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The code server as the chart starts it: its container args (host and port moved
    to a free loopback port), the ConfigMap environment of the deployment, the
    container context and image variables the chart sets. Yields what it reports."""
    from dagster._grpc.client import DagsterGrpcClient
    from dagster._grpc.types import ListRepositoriesResponse
    from dagster._serdes import deserialize_value

    values, deployment = _values(), _deployment()
    port = _free_port()
    args = container_args(deployment)
    args[0] = str(BIN / args[0])
    args[args.index("-h") + 1] = "127.0.0.1"
    args[args.index("-p") + 1] = str(port)
    home = tmp_path_factory.mktemp("dagster_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OONI_", "DAGSTER_"))}
    env.update(code_server_env(values, deployment))
    env["DAGSTER_HOME"] = str(home)  # the chart's /opt/dagster/dagster_home is the image's
    env["DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT"] = json.dumps(
        container_context(values, deployment)
    )
    env["DAGSTER_CURRENT_IMAGE"] = IMAGE
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    server = subprocess.Popen(
        args, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # The chart's readiness probe.
        probe = [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(port)]
        deadline = time.monotonic() + 150
        while subprocess.run(probe, env=env, capture_output=True).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"{shlex.join(args)} did not become healthy:\n{server.stdout.read()}")
            time.sleep(0.5)
        client = DagsterGrpcClient(port=port, host="127.0.0.1")
        yield deserialize_value(client.list_repositories(), ListRepositoriesResponse)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_the_code_server_starts_from_the_charts_command(code_server) -> None:
    """`dagster api grpc -h 0.0.0.0 -p 3030 -m ooni_pipeline.definitions` loads the
    project's Definitions and reports the container context runs are launched with."""
    deployment = _deployment()
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "ooni_pipeline.definitions"]
    [symbol] = code_server.repository_symbols
    assert symbol.attribute == "defs"
    pointer = code_server.repository_code_pointer_dict[symbol.repository_name]
    assert pointer.module == "ooni_pipeline.definitions"
    assert code_server.container_image == IMAGE
    assert code_server.container_context == container_context(_values(), deployment)


def _run_job(code_server, tags: dict[str, str], tmp_path: Path):
    """The Kubernetes Job the run launcher of the rendered instance would create for a
    run of this code location, built by dagster-k8s as ``K8sRunLauncher`` builds it.
    The launcher loads a kubeconfig naming no reachable cluster instead of the
    in-cluster one (nothing is sent)."""
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s.job import construct_dagster_k8s_job

    config = _validated_instance(_values(), tmp_path / "home")["run_launcher"]["config"]
    processed = process_config(resolve_to_config_type(K8sRunLauncher.config_type()), config)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "none", "user": {}}],
                "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
                "current-context": "none",
            }
        )
    )
    launcher = K8sRunLauncher(
        **{**processed.value, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    )
    [symbol] = code_server.repository_symbols
    origin = JobPythonOrigin(
        "__ASSET_JOB",
        RepositoryPythonOrigin(
            executable_path=code_server.executable_path,
            code_pointer=code_server.repository_code_pointer_dict[symbol.repository_name],
            container_image=code_server.container_image,
            entry_point=code_server.entry_point,
            container_context=code_server.container_context,
        ),
    )
    run = DagsterRun(
        job_name="__ASSET_JOB", run_id=str(uuid.uuid4()), tags=tags, job_code_origin=origin
    )
    context = launcher.get_container_context_for_run(run)
    job_config = context.get_k8s_job_config(
        job_image=origin.repository_origin.container_image, run_launcher=launcher
    )
    job = construct_dagster_k8s_job(
        job_config=job_config,
        args=["dagster", "api", "execute_run", "{}"],
        job_name="dagster-run-test",
        pod_name="dagster-run-test",
        component="run_worker",
        user_defined_k8s_config=context.run_k8s_config,
    )
    return job, context.namespace


def _resources(container) -> dict[str, Any]:
    resources = container.resources
    if not isinstance(resources, dict):
        resources = resources.to_dict()
    return {k: v for k, v in resources.items() if v}


def test_a_run_pod_gets_the_launchers_resources_and_the_code_servers_config(
    code_server, tmp_path
) -> None:
    """A run's pod: the run launcher's per-run resources (a `resources` on the user
    deployment would replace them), the code server's image, ConfigMap, Secrets and
    GeoIP volume, the service account, a non-root user that may write the volume."""
    values, deployment = _values(), _deployment()
    job, namespace = _run_job(code_server, {}, tmp_path)
    pod = job.spec.template.spec
    container = pod.containers[0]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert _resources(container) == launcher["resources"]
    assert container.image == IMAGE
    assert container.args == ["dagster", "api", "execute_run", "{}"]
    env_from = {
        (source.config_map_ref.name if source.config_map_ref else None): "configmap"
        for source in container.env_from
        if source.config_map_ref
    }
    secrets = [source.secret_ref.name for source in container.env_from if source.secret_ref]
    assert "ooni-dagster-ooni-pipeline-user-env" in env_from  # the deployment's `env`
    assert secrets == [ref["name"] for ref in deployment["envSecrets"]]
    mounts = {mount.mount_path: mount.name for mount in container.volume_mounts}
    geoip_dir = deployment["env"]["OONI_GEOIP_DIR"]
    assert geoip_dir in mounts
    claims = {v.name: v.persistent_volume_claim.claim_name for v in pod.volumes}
    assert claims[mounts[geoip_dir]] == "ooni-geoip"
    assert pod.security_context.fs_group == 10001
    assert container.security_context.run_as_non_root is True
    assert pod.service_account_name == "ooni-dagster-user-deployments"
    assert namespace == "dagster"
    pg_password = {e.name: e.value_from for e in container.env if e.value_from}
    assert pg_password["DAGSTER_PG_PASSWORD"].secret_key_ref.name == "ooni-dagster-postgresql"


def test_the_documented_run_tag_replaces_its_resources(code_server, tmp_path) -> None:
    """The tag `dagster-k8s/config` of docs/operations.md ("Kubernetes"), set on a run
    (launchpad, backfill or job tags), sizes that run's pod."""
    section = (REPO_ROOT / "docs" / "operations.md").read_text().split("\n## Kubernetes\n")[1]
    after_tag = section.split("\n## ", 1)[0].split("`dagster-k8s/config`", 1)[1]
    value = json.loads(re.search(r"`(\{.*?\})`", after_tag).group(1))
    job, _ = _run_job(code_server, {"dagster-k8s/config": json.dumps(value)}, tmp_path)
    resources = _resources(job.spec.template.spec.containers[0])
    assert resources == value["container_config"]["resources"]
    assert resources != _values()["runLauncher"]["config"]["k8sRunLauncher"]["resources"]


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of the values with its dotted path."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}.{i}")
    else:
        yield path, node


def literal_secrets(values: dict[str, Any]) -> list[str]:
    """Where the values hold a secret itself rather than a Secret's name: a secret
    variable in an `env` map, list or `envVars`, a chart password, a URL with a
    password, an AWS access key id."""
    leaves = dict(_walk(values))
    found = []
    for path, value in leaves.items():
        parent, _, leaf = path.rpartition(".")
        if leaf in SECRET_VARIABLES or leaf == "postgresqlPassword":
            found.append(path)
        if leaf == "value" and leaves.get(f"{parent}.name") in SECRET_VARIABLES:
            found.append(path)
        if not isinstance(value, str):
            continue
        if re.search(r"://[^/@\s:]+:[^/@\s]+@", value):
            found.append(path)
        if re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", value):
            found.append(path)
        if "=" in value and value.split("=", 1)[0] in SECRET_VARIABLES:
            found.append(path)
    return found


def test_the_values_hold_no_secret_only_secret_names() -> None:
    """Passwords, keys and the ClickHouse DSN come from Kubernetes Secrets named here.
    The chart makes no Postgres password Secret from a literal in the values."""
    values = _values()
    assert literal_secrets(values) == []
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["global"]["postgresqlSecretName"]
    # the check itself finds each way a secret could be written in
    for path, value in {
        "dagster-user-deployments.deployments.0.env.OONI_CLICKHOUSE_URL": "http://ooni@ch:8123/default",
        "dagster-user-deployments.deployments.0.env.OONI_S3_ENDPOINT_URL": "https://k:s3cr3t@minio:9000",
        "postgresql.postgresqlPassword": "hunter2",
        "runLauncher.config.k8sRunLauncher.envVars": ["AWS_SECRET_ACCESS_KEY=abc"],
        "dagster-user-deployments.deployments.0.env.AWS_REGION": "AKIAABCDEFGHIJKLMNOP",
    }.items():
        mutated = copy.deepcopy(values)
        _set(mutated, path, value)
        assert literal_secrets(mutated), path
    listed = copy.deepcopy(values)
    listed["dagster-user-deployments"]["deployments"][0]["env"] = [
        {"name": "OONI_ALERT_WEBHOOK_URL", "value": "https://hooks.example.org/T0/B0/x"}
    ]
    assert literal_secrets(listed)


def test_the_code_servers_secrets_are_required_ones() -> None:
    """Run pods get the deployment's Secrets by name only (dagster-k8s drops
    `optional`), so an optional Secret that does not exist would start the code server
    and stop every run: none is marked optional."""
    deployment = _deployment()
    assert deployment["envSecrets"]
    assert all(not ref.get("optional") for ref in deployment["envSecrets"])
    assert all(not ref.get("optional") for ref in deployment.get("envConfigMaps", []))


def _instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            lines.append((keyword.upper(), rest.strip()))
            current = ""
    return lines


def test_the_image_installs_every_extra_but_the_tests_and_runs_the_charts_args() -> None:
    """The image installs the project with each extra pyproject declares (but `test`),
    from a Python the project supports, as a numeric non-root user, with no
    ENTRYPOINT (the chart and the run launcher pass whole commands as args), its CMD
    the code server of values.yaml; the build context holds what it copies."""
    steps = _instructions(DOCKERFILE)
    installs = [rest for keyword, rest in steps if keyword == "RUN" and "pip install" in rest]
    extras: set[str] = set()
    for command in installs:
        for token in shlex.split(command):
            match = re.fullmatch(r"\.\[([\w,-]+)\]", token)
            if match:
                extras.update(match.group(1).split(","))
    assert installs and extras, installs
    declared = set(_pyproject()["optional-dependencies"])
    assert extras == declared - NOT_IN_IMAGE, (extras, declared)

    bases = [rest for keyword, rest in steps if keyword == "FROM"]
    assert bases and all(re.match(r"python:3\.(\d+)-slim", base) for base in bases), bases
    minimum = int(_pyproject()["requires-python"].removeprefix(">=3."))
    assert all(int(re.match(r"python:3\.(\d+)", b).group(1)) >= minimum for b in bases)

    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users
    assert not [rest for keyword, rest in steps if keyword == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for keyword, rest in steps if keyword == "CMD"]
    assert cmd == container_args(_deployment())

    copied = [
        rest.split()[0] for keyword, rest in steps if keyword == "COPY" and "--from" not in rest
    ]
    ignore = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"
    for source in copied:
        assert f"!{source}" in ignore, source
