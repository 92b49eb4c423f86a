"""DuanFlow's log service: stores the logs stream in Postgres and answers history queries."""
