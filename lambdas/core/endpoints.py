"""Turn a migration file endpoint into a libpq DSN (locally a DSN, on AWS a Secrets Manager secret)."""

from __future__ import annotations

import json
from typing import Any, Protocol

from psycopg2.extensions import make_dsn

from lambdas.core.config import Endpoint


class SecretReader(Protocol):
    def get_secret_value(self, *, SecretId: str) -> dict[str, Any]: ...


class EndpointError(ValueError):
    pass


def resolve_dsn(endpoint: Endpoint, secrets: SecretReader | None = None) -> str:
    """The DSN for `endpoint`. Secrets hold `username` and `password` (the RDS secret format);
    TLS is required for every AWS connection."""
    if endpoint.dsn is not None:
        return endpoint.dsn.get_secret_value()
    if secrets is None or endpoint.secret_arn is None:
        raise EndpointError("this endpoint needs Secrets Manager access (secret_arn given, no client)")
    raw = secrets.get_secret_value(SecretId=endpoint.secret_arn)
    try:
        secret = json.loads(raw["SecretString"])
        user, password = secret["username"], secret["password"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise EndpointError(
            f"secret {endpoint.secret_arn} must be JSON with 'username' and 'password' (the RDS secret format)"
        ) from None
    return str(
        make_dsn(
            host=endpoint.host,
            port=endpoint.port,
            dbname=endpoint.database,
            user=user,
            password=password,
            sslmode="require",
        )
    )


def with_login_of(dsn: str, login_dsn: str) -> str:
    """`dsn`'s server and database, logged in to as `login_dsn`'s user and password (or their absence)."""
    from psycopg2.extensions import parse_dsn

    params = {k: v for k, v in parse_dsn(dsn).items() if k not in ("user", "password")}
    login = parse_dsn(login_dsn)
    params.update({k: login[k] for k in ("user", "password") if k in login})
    return str(make_dsn(**params))
