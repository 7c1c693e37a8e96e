import os
import sys
from pathlib import Path

# The tests run tiny models: one intra-op thread is as fast, and idle OpenMP threads spinning
# against other processes made the suite ~10x slower on a shared 2-core machine. Set before
# torch is imported (subprocesses such as the DDP workers inherit it); a value already set wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Shared test helpers (tests/nets.py) importable from every test folder.
sys.path.insert(0, str(Path(__file__).parent))
