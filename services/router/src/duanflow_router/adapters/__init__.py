"""Implementations of the router's ports: Postgres, S3 and NATS."""
