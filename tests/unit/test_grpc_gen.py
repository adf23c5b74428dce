"""The gRPC code committed under streamsched/grpc_gen/ is exactly what scripts/gen-grpc makes
from proto/streamsched/v1/scheduler.proto, so the .proto and the code cannot drift apart."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "streamsched" / "grpc_gen"


def test_the_committed_grpc_code_is_what_the_proto_generates(tmp_path: Path) -> None:
    subprocess.run(
        [str(REPO / "scripts" / "gen-grpc"), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        check=True,
        capture_output=True,
        timeout=120,
    )
    made = {path.name: path.read_bytes() for path in (tmp_path / "streamsched" / "grpc_gen").iterdir()}
    committed = {path.name: path.read_bytes() for path in GENERATED.iterdir() if path.name in made or path.name.startswith("scheduler_pb2")}
    assert sorted(made) == ["scheduler_pb2.py", "scheduler_pb2.pyi", "scheduler_pb2_grpc.py", "scheduler_pb2_grpc.pyi"]
    stale = [name for name in made if committed.get(name) != made[name]]
    assert stale == [], f"{', '.join(stale)} differ from what the .proto generates: run scripts/gen-grpc and commit the result"
    assert sorted(committed) == sorted(made), "a generated module that the .proto no longer makes: delete it"
