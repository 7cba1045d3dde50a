import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
if "HF_DATASETS_CACHE" not in os.environ:  # ftkit.tasks.data's Arrow caches: one throwaway dir per session
    _cache = tempfile.mkdtemp(prefix="ftkit-tests-datasets-")
    os.environ["HF_DATASETS_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def char_tokenizer():
    from ftkit.model.char_tokenizer import build_char_tokenizer

    return build_char_tokenizer()
