"""What a Ray worker's failure is called: the user's own mistake (data missing on a node, an
unreadable image) ends the search as the user's error (exit 2), never as a cluster fault and never
in a loop of replacement workers; actors that keep dying at start are a cluster fault."""
from __future__ import annotations

import threading

import pytest

from evoprune.db import store
from evoprune.errors import EvopruneError
from evoprune.evolve.config import Config, ProxyConfig, RunConfig, SearchConfig
from evoprune.evolve.service import run_search
from evoprune.workers.evaluator import ClusterError, RayEvaluator, WorkerSpec

from helpers import image_folder


def _start(spec: WorkerSpec, workers: int, seconds: float = 120.0) -> tuple[BaseException | None, RayEvaluator]:
    """A pool's wait_ready, in a thread: what it raised (a failure if it never returns), and the pool."""
    pool = RayEvaluator(spec, workers=workers, placement_timeout_s=60)
    raised: list[BaseException | None] = [None]

    def go():
        try:
            pool.wait_ready()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            raised[0] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    try:
        t.join(seconds)
        if t.is_alive():  # end its loop (no more replacements, no more patience) before failing
            pool.size, pool.placement_timeout_s = 0, 0.0
            t.join(60)
            raise AssertionError(f"the pool was still starting workers after {seconds:.0f} s")
    finally:
        pool.close()
    return raised[0], pool


def test_data_missing_on_the_workers_is_the_users_error(ray_session, tmp_path):
    spec = WorkerSpec(proxy=ProxyConfig(tasks=("mnist-cnn",)), data_root=str(tmp_path / "nothing"),
                      cache_dir=str(tmp_path / "cache"))  # no driver's copy: each worker loads its own
    e, pool = _start(spec, 2)
    assert isinstance(e, EvopruneError) and not isinstance(e, ClusterError), repr(e)
    assert str(e).startswith("a Ray worker cannot start: mnist: no IDX files at"), str(e)
    assert pool.restarts == 0  # found out from the first worker: none was started again


def test_a_model_module_missing_on_the_workers_is_the_users_error(ray_session, tmp_path, monkeypatch):
    """An `import:` model's module the driver imports and the workers cannot (not installed on
    their node): the actors cannot unpickle the driver's model; that is said as the user's to fix."""
    import importlib

    (tmp_path / "only_on_the_driver.py").write_text("class Net:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = importlib.import_module("only_on_the_driver").Net()
    spec = WorkerSpec(proxy=ProxyConfig(tasks=("digits-cnn",)), cache_dir=str(tmp_path),
                      pretrained={"digits-cnn": net})
    e, _ = _start(spec, 1)
    assert isinstance(e, EvopruneError) and not isinstance(e, ClusterError), repr(e)
    assert "cannot load the task's model (ModuleNotFoundError: No module named 'only_on_the_driver')" in str(e)


def test_workers_that_keep_dying_at_start_are_a_cluster_fault(ray_session, tmp_path):
    spec = WorkerSpec(proxy=ProxyConfig(tasks=("digits-cnn",)), cache_dir=str(tmp_path),
                      pretrained={"digits-cnn": "not a pretrained model"})  # the actors crash building their tasks
    e, _ = _start(spec, 2)
    assert isinstance(e, ClusterError) and "died starting" in str(e), repr(e)


@pytest.mark.slow
def test_an_unreadable_image_on_a_worker_ends_the_search_as_the_users_error(ray_session, shared_data, cache_dir,
                                                                            tmp_path):
    """The images turn unreadable once the driver has loaded the task (a network share losing
    them): the workers' fine-tunes hit them. The run is marked failed (resumable), exit 2."""
    folder = image_folder(tmp_path / "imgs", shared_data, classes=3, train=24, val=4)
    tasks = tmp_path / "tasks.toml"
    tasks.write_text(f'[imgs-cnn]\ndataset = "imagefolder:{folder}?size=8"\nmodel = "cnn"\n'
                     'recipe = { epochs = 1, batch_size = 16 }\n')
    cfg = Config(search=SearchConfig(population=4, generations=1, seeds=("l1", "fpgm"), validation_orders=0),
                 proxy=ProxyConfig(tasks=("imgs-cnn",), finetune_steps=2, batch_size=8, recalibrate_images=16,
                                   stat_images=16, screen=False),
                 run=RunConfig(workers=2, threads=1, cache_dir=str(cache_dir), tasks_file=str(tasks), device="cpu"))
    images = sorted((folder / "train").rglob("*.png"))

    def spoil(kind, info):
        if kind == "status" and info["text"] == "searching":
            for p in images:
                p.write_bytes(p.read_bytes()[:40])

    db = tmp_path / "e.db"
    with pytest.raises(EvopruneError) as raised:
        run_search(cfg, db_url=f"sqlite:///{db}", on_progress=spoil)
    assert not isinstance(raised.value, ClusterError)
    assert "imagefolder: cannot read " in str(raised.value) and "on a Ray worker" in str(raised.value)
    run = store.get_run(store.connect(f"sqlite:///{db}"), 1)
    assert run.status == "failed" and "cannot read" in run.note, (run.status, run.note)
