"""The test suite; shared helpers live in tests/support/, fixtures and hooks in conftest.py."""
