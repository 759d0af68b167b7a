"""Shared fixtures: the real data under ../shared/data, a pretrained digits model, one Ray session."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real data subsets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cifar_batch(shared_data):
    """32 real CIFAR-10 training images and their labels folded into 4 classes."""
    from evoprune.data import iterate, load_dataset

    ds = load_dataset("cifar10", shared_data)
    x, y = next(iterate(ds, ds.train, batch_size=32, shuffle=True, seed=3))
    return x, y % 4


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One pretraining cache for the whole session: each task is trained at most once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def digits_pretrained(cache_dir):
    from evoprune.pretrain import pretrained
    from evoprune.tasks import get_task

    return pretrained(get_task("digits-cnn"), cache_dir=cache_dir, device="cpu")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the user's own data root, cache or task file."""
    for var in ("EVOPRUNE_DATA_ROOT", "EVOPRUNE_CACHE", "EVOPRUNE_TASKS", "EVOPRUNE_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting one costs ~6-9 s)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def searched(digits_pretrained, cache_dir, tmp_path_factory):
    """A real (small) digits search's database: (path, SearchResult)."""
    from evoprune.evolve.config import Config, ProxyConfig, SearchConfig
    from evoprune.evolve.service import run_search

    db = tmp_path_factory.mktemp("q") / "q.db"
    cfg = Config(search=SearchConfig(population=8, generations=1, seed=0, seeds=("l1", "bn_scale", "fpgm")),
                 proxy=ProxyConfig(tasks=("digits-cnn",), finetune_steps=3, recalibrate_images=128, stat_images=128))
    cfg = Config(search=cfg.search, proxy=cfg.proxy, run=type(cfg.run)(cache_dir=str(cache_dir), device="cpu"))
    result = run_search(cfg, db_url=f"sqlite:///{db}")
    return db, result
