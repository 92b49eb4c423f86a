"""DuanFlow host agent: reports the host's GPUs, starts and stops replicas, relays their output as log lines."""
