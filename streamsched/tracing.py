"""OpenTelemetry traces of tasks: one trace per task, a span per hop, context in NATS headers.

Off unless configured. :func:`configure` (called by every role command, and by
:meth:`streamsched.client.Client.connect`) turns tracing on when the standard variables
ask for export and the SDK is not disabled:

* ``OTEL_SDK_DISABLED=true``: off, whatever else is set;
* ``OTEL_TRACES_EXPORTER`` set to anything but ``none``: on, exporting with it
  (``otlp``, ``console``; the first of a comma-separated list);
* else ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set: on, over OTLP;
* else off.

OTLP needs the ``otlp`` extra (``pip install 'streamsched[otlp]'``); its protocol comes from
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the
default, or ``grpc``), everything else (endpoint, headers, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``) as the SDK reads it. A program that sets up
OpenTelemetry itself calls :func:`enable` with its tracer provider (tests use an in-memory exporter).

Context crosses NATS as a W3C ``traceparent`` header on each hop's publish; every hop
makes a span that is a child of the one it received and hands its own on. The hops'
spans (client submit, master, regional) start and end as the hop hands the task on;
a worker's attempt span lasts as long as the attempt. With tracing off (:data:`ENABLED`
False) the per-task paths do one check of that flag and nothing else: no header, no span.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

log = logging.getLogger("streamsched.tracing")

#: The W3C trace context header, as it travels in NATS headers (lower case, as the spec writes it).
TRACEPARENT = "traceparent"

#: True while spans are made. A module-level flag, read once per task by the hops.
ENABLED = False

#: A span attribute value (what the per-hop helpers accept).
Attributes = Mapping[str, str | int | float | bool]

E = TypeVar("E", bound=msgspec.Struct)

_tracer: trace.Tracer = trace.NoOpTracer()
_provider: TracerProvider | None = None  # the one :func:`configure` made, flushed by :func:`shutdown`
#: The attempt span a worker's task runs under (each attempt is its own asyncio task).
_attempt: contextvars.ContextVar[tuple[Span, str] | None] = contextvars.ContextVar("streamsched_attempt_span", default=None)
#: The trace context of the submission a master's intake step works on (each step is its own asyncio task).
parent: contextvars.ContextVar[str | None] = contextvars.ContextVar("streamsched_trace_parent", default=None)
#: The spans of a workflow's tasks taken in so far, by task id: a task's span links to those of its dependencies.
siblings: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("streamsched_trace_siblings", default=None)


def requested_exporter(env: Mapping[str, str] | None = None) -> str | None:
    """The exporter the ``OTEL_*`` variables ask for (``otlp``, ``console``…), or None: tracing stays off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER", "").split(",")[0].strip().lower()
    if exporter:
        return None if exporter == "none" else exporter
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "otlp"
    return None


def configure(service: str) -> bool:
    """Turn tracing on if the environment asks for it (see the module's docstring); True if on.
    ``service`` is the ``service.name`` unless ``OTEL_SERVICE_NAME`` names one."""
    exporter_name = requested_exporter()
    if exporter_name is None or ENABLED:
        return ENABLED
    global _provider
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(_exporter(exporter_name)))
    _provider = provider
    enable(provider)
    log.info("tracing on: exporting spans with %s", exporter_name)
    return True


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported here: use otlp, console or none")
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            exporter: SpanExporter = GrpcExporter()
            return exporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter()
        return exporter
    except ImportError:
        raise RuntimeError("OTLP trace export needs the otlp extra: pip install 'streamsched[otlp]'") from None


def enable(provider: trace.TracerProvider | None = None) -> None:
    """Make spans from now on, with ``provider`` (default: the global one, which a program
    that configures OpenTelemetry itself has set)."""
    global ENABLED, _tracer
    _tracer = (provider or trace.get_tracer_provider()).get_tracer("streamsched")
    ENABLED = True


def disable() -> None:
    """Stop making spans (what is already made is exported as its processor does)."""
    global ENABLED, _tracer
    ENABLED = False
    _tracer = trace.NoOpTracer()


def shutdown() -> None:
    """Flush and stop the exporter :func:`configure` made (a role's last step)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None
    disable()


def _context_of(traceparent: str | None) -> otel_context.Context | None:
    """The context whose current span is the remote one ``traceparent`` names; None (the
    caller's current context) for none, or one that is not a valid version-00 traceparent.
    Parsed here rather than by the SDK's propagator, which costs a third of a hop's span."""
    found = _span_context(traceparent) if traceparent else None
    return None if found is None else trace.set_span_in_context(NonRecordingSpan(found))


def _span_context(traceparent: str) -> SpanContext | None:
    parts = traceparent.split("-")
    if len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        found = SpanContext(int(parts[1], 16), int(parts[2], 16), is_remote=True, trace_flags=TraceFlags(int(parts[3], 16)))
    except ValueError:
        return None
    return found if found.is_valid else None


def traceparent_of(span: Span) -> str:
    """The W3C ``traceparent`` that makes the next hop's span a child of ``span``."""
    found = span.get_span_context()
    return f"00-{found.trace_id:032x}-{found.span_id:016x}-{int(found.trace_flags):02x}"


def trace_id(traceparent: str) -> str:
    """The trace id (32 hex digits) of a ``traceparent``; "" for none."""
    return traceparent[3:35] if len(traceparent) >= 55 else ""


def start(name: str, parent: str | None, attributes: Attributes, links: Iterable[str] = (), kind: SpanKind = SpanKind.INTERNAL) -> Span:
    """A span under ``parent`` (a ``traceparent``; none: a new trace), linked to the spans ``links`` name."""
    span_links = [Link(found) for link in links if (found := _span_context(link)) is not None]
    return _tracer.start_span(name, context=_context_of(parent), kind=kind, attributes=dict(attributes), links=span_links)


def hop(name: str, parent: str | None, attributes: Attributes, links: Iterable[str] = (), kind: SpanKind = SpanKind.INTERNAL) -> str:
    """Record a hop that hands a task on: a span started and ended now; its ``traceparent``."""
    span = start(name, parent, attributes, links, kind)
    span.end()
    return traceparent_of(span)


def stamped(events: Sequence[E], traceparent: str) -> list[E]:
    """``events`` with ``trace`` set where it is empty (events are frozen structs)."""
    return [event if getattr(event, "trace", "") else msgspec.structs.replace(event, trace=traceparent) for event in events]


def begin_attempt(parent: str | None, task_id: str, task_type: str, attempt: int, region: str, worker: str) -> str:
    """Open the span of one attempt in the running asyncio task (a worker runs each delivery
    in its own), current for the handler's own spans; its ``traceparent``."""
    attributes = task_attributes(task_id, task_type, attempt=attempt, region=region)
    attributes["streamsched.worker"] = worker
    span = start("worker attempt", parent, attributes, kind=SpanKind.CONSUMER)
    traceparent = traceparent_of(span)
    otel_context.attach(trace.set_span_in_context(span))  # this task's context only: it ends with the attempt
    _attempt.set((span, traceparent))
    return traceparent


def end_attempt(outcome: str, error: str = "") -> str:
    """End the running asyncio task's attempt span (``outcome``: succeeded, retrying, failed…); its ``traceparent``, or ""."""
    current = _attempt.get()
    if current is None:
        return ""
    span, traceparent = current
    _attempt.set(None)
    span.set_attribute("streamsched.outcome", outcome)
    if error:
        span.set_status(Status(StatusCode.ERROR, error[:512]))
    span.end()
    return traceparent


def task_attributes(task_id: str, task_type: str, *, attempt: int = 0, region: str = "") -> dict[str, str | int | float | bool]:
    """The attributes of a task's span."""
    attributes: dict[str, str | int | float | bool] = {"streamsched.task.id": task_id, "streamsched.task.type": task_type}
    if attempt:
        attributes["streamsched.attempt"] = attempt
    if region:
        attributes["streamsched.region"] = region
    return attributes


@contextlib.contextmanager
def producing(name: str, attributes: Attributes, headers: dict[str, str]) -> Iterator[None]:
    """A span around a submitter's publish (a child of the caller's current span, if any), its
    ``traceparent`` put in ``headers``; an exception out of the block marks it failed."""
    span = start(name, None, attributes, kind=SpanKind.PRODUCER)
    headers[TRACEPARENT] = traceparent_of(span)
    with trace.use_span(span, end_on_exit=True):
        yield
