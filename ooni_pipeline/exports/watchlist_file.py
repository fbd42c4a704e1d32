"""The watchlist file: which domains each consumer (a newsroom) follows.

YAML, its path in ``OONI_WATCHLISTS``, read when the code location loads, so that a
consumer added there becomes its own asset (``watchlists/<consumer>``) with no code
change::

    consumers:
      bbc: [bbc.com, bbc.co.uk, bbci.co.uk]
      dw:
        - dw.com
      rsf:                        # the mapping form: its domains, and optionally
        domains: [rsf.org]        # the environment variable holding its own
        webhook_env: RSF_WEBHOOK_URL  # webhook's URL (a secret: never in the file)

Anything wrong (an unknown key, a duplicate consumer or domain, a name that is not a
safe path segment, a domain that is not one) fails the load with the file and line;
nothing runs, so no published object changes. Only ``consumers`` is a top-level
key: a typo such as ``consumer:`` would otherwise export nothing, silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import idna
import yaml

from ooni_pipeline.untrusted import excerpt

# A consumer name is an object-key segment and an asset-key segment.
CONSUMER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
# The IDNA (ASCII) form, at least two labels: a bare TLD would watch half the web.
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
MAX_FILE_BYTES = 1_000_000
TOP_LEVEL_KEYS = ("consumers",)
CONSUMER_KEYS = ("domains", "webhook_env")
# An environment variable a consumer's webhook URL is read from: a plain name, and none
# of the project's own (its configuration and secrets: the ClickHouse URL, the
# operator's webhook, S3 and Dagster credentials), whose value would otherwise be
# posted to, or be the address posted to.
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
RESERVED_ENV_PREFIXES = ("OONI_", "AWS_", "DAGSTER_")


@dataclass(frozen=True)
class Consumer:
    """A consumer of the watchlist file: its domains (lowercase IDNA, in file order)
    and the name of the environment variable holding its webhook URL, if any."""

    domains: tuple[str, ...]
    webhook_env: str | None = None


class WatchlistError(ValueError):
    """The watchlist file is wrong; the message names the file and line."""


def normalize_domain(text: str) -> str | None:
    """The lowercase IDNA form of a domain (``None`` if it is not one), so that
    matching is a plain label comparison.

    IDNA 2008 with UTS #46 mapping, non-transitional, as browsers resolve names (the
    ``idna`` package): ``straße.de`` is ``xn--strae-oqa.de``, its own domain, not
    ``strasse.de`` as in IDNA 2003 (Python's ``idna`` codec)."""
    name = text.strip().rstrip(".")
    try:
        ascii_name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
    except (UnicodeError, ValueError):
        return None
    return ascii_name if _DOMAIN.fullmatch(ascii_name) and len(ascii_name) <= 253 else None


def load_watchlists(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Consumer name -> its domains (lowercase IDNA), in file order."""
    return {name: consumer.domains for name, consumer in load_consumers(path).items()}


def load_consumers(path: str | Path) -> dict[str, Consumer]:
    """Consumer name -> its domains and webhook variable, in file order."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise WatchlistError(f"{path}: cannot read the watchlist file ({exc.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise WatchlistError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        root = yaml.compose(data.decode("utf-8"), Loader=yaml.SafeLoader)
    except UnicodeDecodeError as exc:
        raise WatchlistError(f"{path}: not UTF-8 (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise WatchlistError(f"{where}: not valid YAML ({getattr(exc, 'problem', '')})") from None

    def fail(node: yaml.Node, what: str) -> WatchlistError:
        return WatchlistError(f"{path}:{node.start_mark.line + 1}: {what}")

    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise fail(root, "expected a mapping with the key 'consumers'")
    consumers: dict[str, Consumer] = {}
    for key, value in root.value:
        if not isinstance(key, yaml.ScalarNode) or key.value not in TOP_LEVEL_KEYS:
            raise fail(key, f"unknown key {excerpt(key.value)} (expected one of {TOP_LEVEL_KEYS})")
        if isinstance(value, yaml.ScalarNode) and value.value in ("", "~", "null"):
            continue
        if not isinstance(value, yaml.MappingNode):
            raise fail(
                value,
                "'consumers' must map each consumer name to a list of domains "
                "or to a mapping with 'domains' (and 'webhook_env')",
            )
        for name_node, domains_node in value.value:
            name = name_node.value if isinstance(name_node, yaml.ScalarNode) else None
            if not isinstance(name, str) or not CONSUMER_NAME.fullmatch(name):
                raise fail(
                    name_node,
                    f"consumer name {excerpt(name_node.value)} is not a safe path segment "
                    "(1 to 63 of a-z, 0-9, '_', '-', starting with a letter or digit)",
                )
            if name in consumers:
                raise fail(name_node, f"duplicate consumer {name!r}")
            consumers[name] = _consumer(domains_node, name, fail)
    return consumers


def _consumer(node: yaml.Node, consumer: str, fail) -> Consumer:
    """A consumer's value: the list of its domains, or ``{domains: [...],
    webhook_env: NAME}``."""
    if not isinstance(node, yaml.MappingNode):
        return Consumer(_domains(node, consumer, fail))
    fields: dict[str, yaml.Node] = {}
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.value not in CONSUMER_KEYS:
            raise fail(
                key,
                f"consumer {consumer!r}: unknown key {excerpt(key.value)} "
                f"(expected one of {CONSUMER_KEYS})",
            )
        if key.value in fields:
            raise fail(key, f"consumer {consumer!r}: duplicate key {key.value!r}")
        fields[key.value] = value
    if "domains" not in fields:
        raise fail(node, f"consumer {consumer!r}: 'domains' is missing")
    domains = _domains(fields["domains"], consumer, fail)
    env_node = fields.get("webhook_env")
    if env_node is None:
        return Consumer(domains)
    return Consumer(domains, _webhook_env(env_node, consumer, fail))


def _webhook_env(node: yaml.Node, consumer: str, fail) -> str:
    name = node.value if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
        shown = excerpt(name) if isinstance(name, str) else "a non-scalar"
        raise fail(
            node,
            f"consumer {consumer!r}: webhook_env {shown} is not the name of an environment "
            "variable ([A-Z_][A-Z0-9_]*; the URL itself never goes in the file)",
        )
    if name.startswith(RESERVED_ENV_PREFIXES):
        raise fail(
            node,
            f"consumer {consumer!r}: webhook_env {name!r} is one of the project's own "
            f"variables (names starting with {', '.join(RESERVED_ENV_PREFIXES)} are refused)",
        )
    return name


def _domains(node: yaml.Node, consumer: str, fail) -> tuple[str, ...]:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise fail(node, f"consumer {consumer!r}: expected a non-empty list of domains")
    domains: list[str] = []
    for item in node.value:
        domain = normalize_domain(item.value) if isinstance(item, yaml.ScalarNode) else None
        if domain is None:
            shown = excerpt(item.value) if isinstance(item, yaml.ScalarNode) else "a non-scalar"
            raise fail(item, f"consumer {consumer!r}: {shown} is not a domain name")
        if domain in domains:
            raise fail(item, f"consumer {consumer!r}: duplicate domain {domain!r}")
        domains.append(domain)
    return tuple(domains)
