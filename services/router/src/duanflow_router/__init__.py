"""DuanFlow router: control plane (apps, releases, functions) and GPU placement over agents' capacity."""

__version__ = "0.1.0"
