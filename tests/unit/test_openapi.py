"""openapi.yaml at the repository root is the app's own schema."""

from __future__ import annotations

from pathlib import Path

from service.cli import openapi_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_openapi_yaml_matches_the_app() -> None:
    committed = (ROOT / "openapi.yaml").read_text()
    assert committed == openapi_yaml(), "openapi.yaml is stale: run `make openapi`"


def test_openapi_lists_health_endpoints() -> None:
    import yaml

    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    assert {"/v1/health/live", "/v1/health/ready"} <= set(spec["paths"])
