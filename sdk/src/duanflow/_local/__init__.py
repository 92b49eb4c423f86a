"""The embedded local stack: real NATS, Postgres and S3 servers on loopback, the services and one agent."""
