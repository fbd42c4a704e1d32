"""Showing untrusted upstream content in an error message, safely.

An error travels to the run log, Dagster's run storage and the failure alert, so
whatever an upstream file holds must not ride along: a hostile file may be a link
to the environment, or text made to look like something else. Errors name the
file, line and field and show at most ``excerpt`` of the offending value.
"""

EXCERPT_CHARS = 40


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """At most ``limit`` characters of ``value``, escaped by ``repr`` (control, bidi
    and other unprintable characters become escapes), saying how much was left out."""
    if isinstance(value, str):
        shown = repr(value[:limit])
        rest = len(value) - limit
    else:
        text = repr(value)
        shown, rest = text[:limit], len(text) - limit
    return f"{shown}... (+{rest} more characters)" if rest > 0 else shown


def chat_literal(text: str) -> str:
    """``text`` as a literal block for a Slack-compatible chat (Slack, Mattermost):
    a fenced code block, so no Markdown applies (no image, link or emphasis), with
    backticks that could close the fence replaced and Slack's control characters
    (``<!channel>`` mentions, ``<url|label>`` links) escaped as Slack requires."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "'")
    return f"```\n{escaped}\n```"
