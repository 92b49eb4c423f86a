"""DuanFlow's HTTP gateway: deployed endpoints served over HTTP, each request an invocation of its function."""
