"""Shared pytest set-up: make the repository root importable and keep every test offline."""
import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The tests never reach the Hugging Face hub; fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest and does not stall on a busy 2-core box. Modules opt in with
    pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def threads_and_signals():
    """One intra-op thread (2 shared cores: more threads are slower, and results stay comparable with the
    OMP_NUM_THREADS=1 subprocesses), and the SIGINT/SIGTERM handlers that train.main installs restored afterwards.
    Modules that call the scripts' main() in-process opt in with
    pytestmark = pytest.mark.usefixtures("threads_and_signals")."""
    n = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    for s, h in handlers.items():
        signal.signal(s, h)
