import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # torchvision's pattern: the needs_cuda mark becomes a skip on machines without a GPU.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)
