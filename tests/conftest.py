"""Shared test fixtures and constants (STYLE.md B8)."""
from pathlib import Path

#: Real datasets shipped next to the repo (../shared/data), each with a PROVENANCE.md.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs internet access; runs only with TTDS_NETWORK_TESTS=1")
