"""Adapters implementing the agent's ports: NVML, bundle downloads, processes, NATS."""
