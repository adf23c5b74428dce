"""Schemathesis against the REST API's own OpenAPI document: every operation, with
generated requests (bounded), answers without a server error and as its document says."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from streamsched.rest import create_app
from streamsched.testing import serving_http

pytestmark = pytest.mark.anyio

#: Generated requests per operation: bounded, so the suite stays within its time.
EXAMPLES = 100
#: Operations left out: the event feed streams until the client goes.
SKIPPED = {("GET", "/api/v1/events")}


@pytest.fixture
async def served(settings, bus) -> AsyncIterator[str]:
    async with serving_http(create_app(settings)) as base_url:
        yield base_url


def fuzz(base_url: str, document: dict[str, Any]) -> dict[str, int]:
    """Every operation's generated requests; the count per operation (raises on the first failed check)."""
    schema = schemathesis.openapi.from_dict(document)
    counted: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue
        counted[f"{operation.method.upper()} {operation.path}"] = 0
        run_checks(operation, base_url, counted)
    return counted


def run_checks(operation: Any, base_url: str, counted: dict[str, int]) -> None:
    name = f"{operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy())
    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        case.call_and_validate(base_url=base_url, checks=[not_a_server_error, content_type_conformance, response_schema_conformance])
        counted[name] += 1

    check()


async def test_generated_requests_get_no_server_error_and_conform_to_the_document(served):
    async with httpx.AsyncClient(base_url=served) as http:
        document = (await http.get("/openapi.json")).json()
    counted = await anyio.to_thread.run_sync(fuzz, served, document)
    assert "POST /api/v1/tasks" in counted and "GET /api/v1/tasks" in counted
    assert all(count > 0 for count in counted.values()), counted
