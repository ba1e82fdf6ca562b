"""Shared test fixtures and constants (STYLE.md B8)."""
import os
from pathlib import Path

# Ray/HF settings every test process and the Ray workers it starts need (../shared/notes/ray-2.60.md).
for _k, _v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_USE_DATASOURCE_V2": "0",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

#: Real datasets shipped next to the repo (../shared/data), each with a PROVENANCE.md.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs internet access; runs only with TTDS_NETWORK_TESTS=1")
