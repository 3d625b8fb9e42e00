import os

# Before anything imports ray (tests of the Ray glue share one local cluster per session).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic():
    from hsae.synthetic import sparse_dictionary_data

    return sparse_dictionary_data(12_288, d=32, n_atoms=128, seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (ray.init costs ~6.5 s here)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        ray.init("local", num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024 * 1024,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_harvest_cfg():
    from hsae.activations import HarvestConfig
    from hsae.corpora import CorpusSpec
    from hsae.models import ModelSpec

    return HarvestConfig(model=ModelSpec("tiny"), corpus=CorpusSpec("toy"), ctx_len=32, n_ctxs=40,
                         n_eval_ctxs=8, shard_ctxs=16, forward_batch=8, holdout_fraction=0.3)
