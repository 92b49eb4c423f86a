"""Adapters of the builder's ports: Postgres, S3, uv, NATS, clock."""
