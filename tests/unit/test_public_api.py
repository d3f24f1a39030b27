"""The exported names: ``authz.__all__`` is pinned, and every module's ``__all__`` holds."""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import version

import pytest

import authz


def modules() -> dict[str, bool]:
    """Every module under ``authz`` -> whether it is a package. Skips ``__main__``
    modules, which run the CLI on import, and the modules protoc generates
    (``authz/v1/*_pb2*.py``, scripts/generate-protos: no ``__all__``, never edited)."""
    return {
        info.name: info.ispkg
        for info in pkgutil.walk_packages(authz.__path__, prefix="authz.")
        if not info.name.endswith(("__main__", "_pb2", "_pb2_grpc"))
    }


def test_package_exports() -> None:
    assert sorted(authz.__all__) == ["AuthzError", "__version__"]
    assert issubclass(authz.AuthzError, Exception)


def test_version_matches_the_installed_distribution() -> None:
    assert authz.__version__ == version("authz")


def test_the_request_path_modules_are_found() -> None:
    assert {
        "authz.core.input",
        "authz.core.decision",
        "authz.core.response",
        "authz.runtime.config",
    } <= set(modules())


@pytest.mark.parametrize(("name", "is_package"), sorted(modules().items()), ids=sorted(modules()))
def test_every_exported_name_exists(name: str, is_package: bool) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        # Only a package's __init__ may export nothing (a docstring-only namespace).
        assert is_package, f"{name} has no __all__"
        return
    assert len(exported) == len(set(exported)), f"{name}.__all__ has duplicates"
    assert [item for item in exported if not hasattr(module, item)] == []
