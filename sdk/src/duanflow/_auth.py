"""Authentication policies of HTTP endpoints."""

from __future__ import annotations

import re
from dataclasses import dataclass

from duanflow._errors import InvalidOptionError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Auth:
    """Who may call an endpoint.

    Example::

        @app.endpoint(method="POST", path="/v1/chat", auth=df.Auth.bearer("DUANFLOW_API_KEY"))
        def chat(request): ...
    """

    secret: str | None = None
    """Name of the secret (env var) whose value the bearer token must equal; None: public."""

    @classmethod
    def bearer(cls, secret_name: str) -> Auth:
        """Require ``Authorization: Bearer <token>`` equal to the value of the secret ``secret_name``.

        Example::

            auth = df.Auth.bearer("DUANFLOW_API_KEY")
        """
        if not isinstance(secret_name, str) or not _ENV_NAME.match(secret_name):
            raise InvalidOptionError(
                f"Auth.bearer() needs the name of a secret env var such as 'DUANFLOW_API_KEY', got {secret_name!r}"
            )
        return cls(secret_name)

    @classmethod
    def none(cls) -> Auth:
        """A public endpoint: no authentication.

        Example::

            @app.endpoint(path="/healthz", method="GET", auth=df.Auth.none())
            def healthz(request): ...
        """
        return cls(None)
