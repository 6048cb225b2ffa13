"""A key written twice in one mapping is refused: YAML says keys are unique, and PyYAML would silently keep
the last one (a copied source block whose name was not changed replaced the first source)."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, parse_config

TWO_SOURCES_ONE_NAME = """
sources:
  consignease: {path: /webhooks/a, provider: svix, secrets: [whsec_abc]}
  consignease: {path: /webhooks/b, provider: svix, secrets: [whsec_abc]}
"""


def test_a_duplicate_key_is_refused_with_its_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(TWO_SOURCES_ONE_NAME, origin="routes.yaml")
    [error] = caught.value.errors
    assert error.startswith("routes.yaml: not valid YAML")
    assert "consignease" in error and "line 4" in error


def test_merge_keys_may_still_be_overridden() -> None:
    config = parse_config(
        """
sources:
  a: &base {path: /webhooks/a, provider: svix, secrets: [whsec_abc]}
  b:
    <<: *base
    path: /webhooks/b
"""
    )
    assert config.sources["b"].path == "/webhooks/b"
