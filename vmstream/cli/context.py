"""What every CLI command shares: the settings, built once per run, and the agent client."""

from __future__ import annotations

from functools import cache

from vmstream.agentapi import AgentClient
from vmstream.settings import Settings, load_settings


@cache
def settings() -> Settings:
    """The CLI's settings (VMSTREAM_* environment), read once."""
    return load_settings()


def client() -> AgentClient:
    return AgentClient(settings().home)
