"""Fixtures are plugins in tests/fix_*.py, one per real service."""

pytest_plugins = ["tests.fix_services", "tests.fix_db", "tests.fix_nats"]
