"""Adapters of the gateway's ports (NATS / JetStream)."""
