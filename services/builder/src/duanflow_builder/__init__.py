"""DuanFlow image builder: Image spec → content-addressed image id → a built, cached image."""
