"""authz's own gRPC API: the committed modules in authz/v1/ are exactly what
``scripts/generate-protos`` compiles proto/authz/v1/*.proto to (docs/decisions.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from authz.v1 import decisions_pb2


def test_generated_modules_are_current(repo_root: Path) -> None:
    """An edited .proto without regenerated modules, or a hand edit of one, fails."""
    result = subprocess.run(
        [str(repo_root / "scripts/generate-protos"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "AUTHZ_VENV": str(Path(sys.executable).parent.parent)},
    )
    assert result.returncode == 0, result.stderr


def test_batch_check_service_is_the_one_served(repo_root: Path) -> None:
    """The service and method the servicer registers exist in the compiled descriptor."""
    service = decisions_pb2.DESCRIPTOR.services_by_name["Decisions"]
    assert service.full_name == "authz.v1.Decisions"
    assert service.methods_by_name["BatchCheck"].input_type.name == "BatchCheckRequest"
    assert (repo_root / "proto/authz/v1/decisions.proto").is_file()
