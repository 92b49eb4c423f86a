"""Shared runtime of DuanFlow services: typed settings, NATS wiring, health, request handlers, migrations.

Services depend on this kit and on ``duanflow_proto``, never on each other.
"""

from duanflow_kit.settings import BaseSettings, env_names, load_settings

__all__ = ["BaseSettings", "env_names", "load_settings"]
