"""How a process proves who it is to NATS, from the standard environment variables (the
ones the ``nats`` CLI reads), never from a command line where ``ps`` would show them:

* ``NATS_USER`` and ``NATS_PASSWORD``: a user of the server config (see :mod:`streamsched.access`);
* ``NATS_CREDS``: a credentials file (JWT and NKey seed) for operator-mode deployments;
* ``NATS_CA``, ``NATS_CERT``, ``NATS_KEY``: TLS, the server checked against the CA, and a
  client certificate when the server asks for one.

A user and password in ``NATS_URL`` (``nats://user:pass@host``) work as well, as nats-py reads them.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any


class CredentialsError(ValueError):
    """The environment names credentials that cannot be used (a missing file, a half pair)."""


def connect_options(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` from the environment; empty when none are set."""
    env = os.environ if env is None else env
    options: dict[str, Any] = {}
    user, password = env.get("NATS_USER"), env.get("NATS_PASSWORD")
    if (user is None) != (password is None):
        raise CredentialsError("set both NATS_USER and NATS_PASSWORD, or neither")
    if user is not None:
        options.update(user=user, password=password)
    if creds := env.get("NATS_CREDS"):
        if not os.path.isfile(creds):
            raise CredentialsError(f"NATS_CREDS names {creds}, which is not a file")
        options["user_credentials"] = creds
    ca, cert, key = env.get("NATS_CA"), env.get("NATS_CERT"), env.get("NATS_KEY")
    if (cert is None) != (key is None):
        raise CredentialsError("set both NATS_CERT and NATS_KEY, or neither")
    if ca or cert:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        if cert and key:
            context.load_cert_chain(cert, key)
        options["tls"] = context
    return options
