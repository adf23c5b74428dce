"""A secured deployment: a nats-server with a user per role (``streamsched access render``),
each role process under its own user, TLS from ``scripts/make-local-ca``. The roles do
their work without one refused subject; a client may not pull WORK or delete a stream; a
region's worker may not publish onto another region's WORK."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import msgspec
import nats
import nats.errors
import pytest

from streamsched import access
from streamsched.client import Client
from streamsched.config import Settings
from streamsched.errors import Unavailable
from streamsched.eventlog.state import StateStore
from streamsched.transport import streams
from streamsched.transport.bus import Bus
from streamsched.transport.server import NatsServer, free_port

from ..conftest import REPO
from .conftest import Processes

pytestmark = pytest.mark.anyio

REGIONS = ("default", "eu")


def password(user: str) -> str:
    return f"pw-{user}"


def credentials(user: str) -> dict[str, str]:
    return {"NATS_USER": user, "NATS_PASSWORD": password(user)}


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[NatsServer, Settings]]:
    """A server whose only users are the rendered ones (passwords from its environment)."""
    settings = Settings(regions=list(REGIONS), retry_base_s=0.05, retry_max_s=0.2)
    for user in access.grants(settings):
        monkeypatch.setenv(access.password_variable(user), password(user))
    (tmp_path / "accounts.conf").write_text(access.render(settings))
    (tmp_path / "server.conf").write_text("include accounts.conf\n")
    server = NatsServer(port=free_port(), store_dir=tmp_path / "js", config=tmp_path / "server.conf").start()
    try:
        yield server, msgspec.structs.replace(settings, nats_url=server.url)
    finally:
        server.stop()


async def connect(settings: Settings, user: str) -> Bus:
    return await Bus.connect(settings.nats_url, name=f"test-{user}", environ=credentials(user))


@pytest.fixture
async def admin(secured: tuple[NatsServer, Settings]) -> AsyncIterator[Bus]:
    _, settings = secured
    bus = await connect(settings, access.ADMIN)
    await streams.apply(bus, settings)
    yield bus
    await bus.close()


def violations(server: NatsServer) -> list[str]:
    return [line for line in server.log_path.read_text(errors="replace").splitlines() if "Violation" in line]


async def refused(settings: Settings, user: str, subject: str, body: bytes = b"") -> str:
    """Publish as ``user`` and return the server's refusal (an async -ERR)."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(settings.nats_url, user=user, password=password(user), error_cb=on_error)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(subject, body, timeout=1.0)
        with anyio.fail_after(5):
            while not errors:
                await anyio.sleep(0.02)
    finally:
        await nc.close()
    return str(errors[0])


def test_the_committed_accounts_are_what_the_code_renders():
    assert (REPO / "deploy" / "nats" / "accounts.conf").read_text() == access.render(Settings())


async def test_every_role_does_its_work_under_its_own_user(secured: tuple[NatsServer, Settings], admin: Bus, tmp_path: Path):
    server, settings = secured
    roles = Processes(settings, tmp_path)
    roles.env["STREAMSCHED_REGIONS"] = ",".join(REGIONS)
    try:
        roles.start("master", "master", env=credentials(access.MASTER))
        roles.start("projector", "projector", env=credentials(access.PROJECTOR))
        for region in REGIONS:
            roles.start(f"regional-{region}", "regional", "--region", region, env=credentials(f"regional-{region}"))
            roles.start(f"worker-{region}", "worker", "workers.examples", "--region", region, env=credentials(f"worker-{region}"))
        bus = await connect(settings, access.CLIENT)
        try:
            client = Client(bus, await StateStore.open(bus), settings)
            ran = [await client.submit("echo", {"n": 1}, region=region) for region in REGIONS]
            ran.append(await client.submit("echo", concurrency_key="tenant-1", concurrency_limit=1))
            failed = await client.submit("fail_permanent")
            dead = await client.submit("fail", max_attempts=2)
            delayed = await client.submit("echo", delay_s=60)
            tasks = b'[{"id": "a", "type": "echo"}, {"id": "b", "type": "echo", "depends_on": ["a"]}]'
            flow = await client.submit_message(b'{"workflow": {"id": "wf", "tasks": %s}}' % tasks)
            with anyio.fail_after(30):
                for handle in ran:
                    assert (await client.wait(handle.id)).status == "succeeded", roles.logs()
                assert (await client.wait(failed.id)).status == "failed"
                assert (await client.wait(dead.id)).status == "dead"
                await client.cancel(delayed.id, reason="not needed")
                assert (await client.wait(delayed.id)).status == "cancelled"
                assert (await client.wait_workflow(flow[0])).status == "succeeded"
        finally:
            await bus.close()
    finally:
        roles.stop_all()
    assert violations(server) == [], roles.logs()


async def test_a_client_may_not_pull_work_nor_delete_a_stream(secured: tuple[NatsServer, Settings], admin: Bus):
    _, settings = secured
    await streams.ensure_work_consumers(admin, settings, "default", ["echo"])
    durable = streams.work_consumer_config(settings, "default", "medium", "echo").durable_name
    pulled = await refused(settings, access.CLIENT, f"$JS.API.CONSUMER.MSG.NEXT.WORK.{durable}", b'{"batch": 1}')
    deleted = await refused(settings, access.CLIENT, "$JS.API.STREAM.DELETE.WORK")
    purged = await refused(settings, access.CLIENT, "$JS.API.STREAM.PURGE.EVENTS")
    overwritten = await refused(settings, access.CLIENT, "$JS.API.CONSUMER.DURABLE.CREATE.EVENTS.projector", b"{}")
    for refusal in (pulled, deleted, purged, overwritten):
        assert "permissions violation" in refusal.lower()
    assert (await admin.js.stream_info("WORK")).config.name == "WORK"


async def test_a_worker_may_not_put_work_onto_another_regions_work(secured: tuple[NatsServer, Settings], admin: Bus):
    _, settings = secured
    refusal = await refused(settings, "worker-default", "work.eu.medium.echo", b'{"type": "echo"}')
    assert "permissions violation" in refusal.lower() and "work.eu.medium.echo" in refusal
    assert (await admin.js.stream_info("WORK")).state.messages == 0


def test_a_wrong_password_is_refused(secured: tuple[NatsServer, Settings]):
    _, settings = secured

    async def attempt() -> None:
        await Bus.connect(settings.nats_url, name="test", environ={"NATS_USER": access.CLIENT, "NATS_PASSWORD": "guess"})

    with pytest.raises(Unavailable):
        anyio.run(attempt)


async def test_tls_with_the_local_ca_and_the_committed_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    certs = tmp_path / "certs"
    subprocess.run([REPO / "scripts" / "make-local-ca", certs], check=True, capture_output=True)
    for variable, name in (("NATS_TLS_CA", "ca.pem"), ("NATS_TLS_CERT", "server-cert.pem"), ("NATS_TLS_KEY", "server-key.pem")):
        monkeypatch.setenv(variable, str(certs / name))
    for user in access.grants(Settings()):
        monkeypatch.setenv(access.password_variable(user), password(user))
    server = NatsServer(port=free_port(), store_dir=tmp_path / "js", config=REPO / "deploy" / "nats" / "tls.conf").start()
    try:
        over_tls = {"NATS_CA": str(certs / "ca.pem"), "NATS_CERT": str(certs / "client-cert.pem"), "NATS_KEY": str(certs / "client-key.pem")}
        bus = await Bus.connect(server.url, name="test-tls", environ={**over_tls, **credentials(access.ADMIN)})
        try:
            assert (await bus.js.account_info()).streams == 0  # JetStream answers over TLS
        finally:
            await bus.close()
        with pytest.raises(Unavailable):  # the server trusted, but no certificate of the client's
            await Bus.connect(server.url, name="test-tls", environ={"NATS_CA": str(certs / "ca.pem"), **credentials(access.ADMIN)})
        with anyio.fail_after(10), pytest.raises(Unavailable, match=r"TLS failed.*NATS_CA"):  # the server not trusted: said at once
            await Bus.connect(server.url, name="test-tls", environ=credentials(access.ADMIN))
    finally:
        server.stop()
