"""Tell people when a run fails: a Slack-compatible webhook, or the log.

The timers this project replaces failed silently; operators learnt from
dashboards. ``OONI_ALERT_WEBHOOK_URL`` (a secret: it never appears in logs or
errors) receives ``{"text": ...}``; unset, the alert is logged by the sensor.
Runs that will be retried (``retries``; or by Dagster's run retries) are not
reported: only the last failure is. A job that is not retried because it runs again
within the hour (``common.NOT_RETRIED``) is reported when it starts failing, not again
at each tick while its upstream is down.
"""

from __future__ import annotations

import dagster as dg

from ooni_pipeline import settings
from ooni_pipeline.common import MAX_RETRIES_TAG
from ooni_pipeline.fetch import USER_AGENT
from ooni_pipeline.operations.retries import (
    GIVE_UP_AFTER_S,
    retry_sensor_running,
    will_be_retried,
)
from ooni_pipeline.untrusted import chat_literal

WILL_RETRY_TAG = "dagster/will_retry"
MAX_ERROR_CHARS = 500


def alert_text(context: dg.RunFailureSensorContext, base_url: str) -> str:
    """A short message: job, assets, error, link to the run."""
    run = context.dagster_run
    failures = [
        e
        for e in context.get_step_failure_events()
        if e.step_failure_data and e.step_failure_data.error
    ]
    assets = ", ".join(sorted(key.to_user_string() for key in (run.asset_selection or [])))
    assets = assets or ", ".join(sorted({e.step_key or "" for e in failures})) or run.job_name
    if failures:
        error = failures[0].step_failure_data.error
        while error.cause is not None:  # the user's exception, not Dagster's wrapper
            error = error.cause
        message = error.message
    else:
        message = context.failure_event.message or "unknown error"
    first_line = (message.strip().splitlines() or ["unknown error"])[0][:MAX_ERROR_CHARS]
    partition = run.tags.get("dagster/partition")
    where = f" (partition {partition})" if partition else ""
    # The error may carry upstream or probe-supplied text: it is shown as a literal.
    return (
        f":rotating_light: ooni_pipeline: run of {run.job_name} failed{where}\n"
        f"assets: {assets}\n"
        f"error:\n{chat_literal(first_line)}\n"
        f"{base_url.rstrip('/')}/runs/{run.run_id}"
    )


def post_alert(
    webhook_url: str,
    text: str,
    timeout_s: float = 10.0,
    variable: str = "OONI_ALERT_WEBHOOK_URL",
) -> None:
    """POST ``{"text": text}``; raise without naming the URL on failure (``variable``,
    the environment variable it came from, is named instead)."""
    import requests  # here, not at module level: the code location loads without it

    try:
        response = requests.post(
            webhook_url, json={"text": text}, timeout=timeout_s, headers={"User-Agent": USER_AGENT}
        )
    except requests.RequestException as exc:
        raise RuntimeError(
            f"posting the alert to {variable} failed: {type(exc).__name__}"
        ) from None
    if response.status_code >= 300:
        raise RuntimeError(f"posting the alert to {variable} failed: HTTP {response.status_code}")


def reason_not_to_alert(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str | None:
    """Why the failure of ``run`` is not posted, or ``None``: it is to be retried, or it
    continues a streak of failed runs of a job whose next tick is its retry."""
    if run.tags.get(WILL_RETRY_TAG) == "true":
        return "will be retried"
    if will_be_retried(run) and retry_sensor_running(instance):
        return "will be retried"
    mine = instance.get_run_record_by_id(run.run_id)
    if run.tags.get(MAX_RETRIES_TAG) == "0" and mine is not None:
        previous = instance.get_run_records(
            dg.RunsFilter(job_name=run.job_name, created_before=mine.create_timestamp), limit=1
        )
        if previous and previous[0].dagster_run.status == dg.DagsterRunStatus.FAILURE:
            return "its job's previous run failed too (alerted then)"
    return None


def dagster_url() -> str:
    """The UI's address, for links to runs (``OONI_DAGSTER_URL``)."""
    return settings.env("OONI_DAGSTER_URL", "http://127.0.0.1:3000") or ""


def deliver(text: str, log) -> bool:
    """Post ``text`` to ``OONI_ALERT_WEBHOOK_URL``, or log it when unset; whether posted."""
    webhook_url = settings.env("OONI_ALERT_WEBHOOK_URL")
    if webhook_url:
        post_alert(webhook_url, text)
        return True
    log.warning(f"OONI_ALERT_WEBHOOK_URL unset; alert: {text}")
    return False


def alert_given_up_retry(context: dg.SensorEvaluationContext, run: dg.DagsterRun) -> None:
    """Post the failure of ``run``, whose alert was held back for a retry that could not
    start (runs of the same assets in flight for ``GIVE_UP_AFTER_S``)."""
    base_url = dagster_url()
    partition = run.tags.get("dagster/partition")
    where = f" (partition {partition})" if partition else ""
    text = (
        f":rotating_light: ooni_pipeline: run of {run.job_name} failed{where}; its retry "
        f"did not start within {GIVE_UP_AFTER_S // 3600} hours (runs of the same assets "
        f"in flight)\n{base_url.rstrip('/')}/runs/{run.run_id}"
    )
    deliver(text, context.log)


@dg.run_failure_sensor(
    name="run_failure_alert_sensor",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Posts each failed run (not those about to be retried) to OONI_ALERT_WEBHOOK_URL, or logs it.",
)
def run_failure_alert_sensor(context: dg.RunFailureSensorContext) -> None:
    reason = reason_not_to_alert(context.instance, context.dagster_run)
    if reason:
        context.log.info(f"run {context.dagster_run.run_id} failed: not reported ({reason})")
        return
    if deliver(alert_text(context, dagster_url()), context.log):
        context.log.info(f"alert posted for run {context.dagster_run.run_id}")
