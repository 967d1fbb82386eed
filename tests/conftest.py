import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# W&B never reaches the network from the tests
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
