"""Shared pytest configuration: registers the project's test plugins."""

pytest_plugins = ["tests.postgresql_server", "tests.store_fixtures"]
