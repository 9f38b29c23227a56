"""Put the repository root on sys.path so ``tests.fixtures_models`` imports however pytest is started
(``pytest`` from anywhere, not only ``python -m pytest`` from the root)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
