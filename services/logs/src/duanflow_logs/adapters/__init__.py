"""Adapters of the log service's ports (Postgres, JetStream)."""
