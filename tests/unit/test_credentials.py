"""Credentials and TLS for NATS come from the standard environment variables, checked before use."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamsched.transport.credentials import CredentialsError, connect_options


def test_nothing_set_is_no_options():
    assert connect_options({}) == {}


def test_a_user_and_password_pass_through():
    assert connect_options({"NATS_USER": "worker-default", "NATS_PASSWORD": "s3cret"}) == {"user": "worker-default", "password": "s3cret"}


@pytest.mark.parametrize("env", [{"NATS_USER": "u"}, {"NATS_PASSWORD": "p"}, {"NATS_CERT": "c.pem"}, {"NATS_CREDS": "/nonexistent/x.creds"}])
def test_half_a_pair_or_a_missing_file_is_an_error(env: dict[str, str]):
    with pytest.raises(CredentialsError, match="NATS_"):
        connect_options(env)


def test_a_creds_file_is_passed_by_its_path(tmp_path: Path):
    creds = tmp_path / "role.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    assert connect_options({"NATS_CREDS": str(creds)}) == {"user_credentials": str(creds)}
