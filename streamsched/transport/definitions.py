"""The definition files in ``streamsched/streams/`` (also reachable as ``streams/`` at the
top of a clone) and their one substitution.

Each file holds JetStream API shapes: ``stream/<NAME>.json`` a StreamConfig as
``$JS.API.STREAM.CREATE`` takes it, ``kv/<bucket>.json`` a bucket's config as the NATS
clients take it (``bucket``, ``history``, ``ttl`` ...), ``consumer/<role>.json`` a list of
``{"stream_name": ..., "config": ConsumerConfig}``, the body of ``$JS.API.CONSUMER.CREATE``.
Durations are nanoseconds, as in the API.

What depends on the settings is a placeholder, ``${name}``, filled by :func:`fill`:

* a string that is only ``"${name}"`` becomes the value itself (a number stays a number);
* ``${name}`` inside a longer string becomes the value's text (``"regional-${region}"``);
* an item of a list that names ``${region}``, ``${priority}`` or ``${partition}`` stands for
  one item per region, priority or projector partition of the settings, regions outer, in
  their order (a subject per priority, a durable per region and priority).

That is all: no expressions, no conditions. A computed value (three heartbeats, a window
in messages) is computed in Python and named (:func:`streamsched.transport.streams.placeholders`).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

#: ``${name}``: a lower-case name in braces.
PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")
#: Placeholders that repeat the list item they appear in, once per value.
REPEATED = ("region", "priority", "partition")


def folder() -> Traversable:
    """The definitions, inside the package so that an installed wheel has them too."""
    return resources.files("streamsched").joinpath("streams")


def read(kind: str) -> list[tuple[str, Any]]:
    """``(file stem, parsed JSON)`` of every ``<kind>/*.json``, by file name."""
    files = sorted((entry for entry in folder().joinpath(kind).iterdir() if entry.name.endswith(".json")), key=lambda entry: entry.name)
    return [(entry.name.removesuffix(".json"), json.loads(entry.read_text(encoding="utf-8"))) for entry in files]


def read_one(path: str) -> Any:
    """One file, by its path under the folder (``consumer/worker.json``)."""
    return json.loads(folder().joinpath(path).read_text(encoding="utf-8"))


def names(value: Any) -> set[str]:
    """The placeholders ``value`` mentions, at any depth."""
    if isinstance(value, str):
        return set(PLACEHOLDER.findall(value))
    if isinstance(value, Mapping):
        return set().union(*map(names, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(names, value)) if value else set()
    return set()


def fill(value: Any, values: Mapping[str, Any], repeated: Mapping[str, Sequence[str]]) -> Any:
    """``value`` with its placeholders filled from ``values``, list items repeated over ``repeated``
    (the module's docstring has the rules). An unknown name raises :class:`KeyError`."""
    if isinstance(value, str):
        whole = PLACEHOLDER.fullmatch(value)
        if whole:
            return values[whole.group(1)]
        return PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), value)
    if isinstance(value, Mapping):
        return {key: fill(item, values, repeated) for key, item in value.items()}
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            over = [name for name in REPEATED if name in names(item) and name not in values]
            for combination in itertools.product(*(repeated[name] for name in over)):
                out.append(fill(item, {**values, **dict(zip(over, combination, strict=True))}, repeated))
        return out
    return value
