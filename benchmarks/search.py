"""Search throughput: proxy evaluations per hour, and what the caches and racing save.

    python benchmarks/search.py --data-root ../shared/data [--device cpu|cuda] [--cache-dir DIR]
                                [--skip-digits] [--skip-cifar] [--cifar-candidates 8]
                                [--train masked,pruned] [--workers 2] [--simplify-processes 1,2]
                                [--digits-workers 0,1] [--threads 1] [--gpus-per-worker 1]

1. The default digits search, racing on and off: proxy runs, seconds, evaluations per hour,
   cache hits (same formula / same masks), full fine-tunes racing avoided, and the driver's
   share of the search's wall time (breeding, canonical forms, masks, database: what the proxy
   runs wait for), with `--simplify-processes` processes making the canonical forms, in this
   process or (`--digits-workers 1`) on a pool of Ray workers, which train while the driver breeds
   and simplifies; "workers idle" is the share of the workers' time without a proxy run; the
   last column puts the in-process driver beside a proxy run of the GPU target's 0.072 s.
2. The CIFAR-10 ResNet-20 proxy of configs/cifar10.toml (18 fine-tune steps of 256, about one
   epoch of the subset): seconds per candidate for the screen and the full proxy over the seeded
   baselines, and the resulting candidate evaluations per hour on this device; `--train
   masked,pruned` times both proxies, `--workers 2` also as two concurrent one-thread workers
   (how a search's Ray actors run on a 2-core machine).
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import replace

import torch
from sympy.core.cache import clear_cache

from evoprune.evolve.config import Config, load_config
from evoprune.evolve.service import run_search
from evoprune.masks import TaskMasks
from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.expr import _canonical, parse
from evoprune.train import describe_device
from evoprune.workers.proxy import Job, TaskContext, evaluate_job

GPU_PROXY_S = 0.072  # seconds a candidate at the GPU target (50,000 full proxies an hour)


def digits(args):
    cfg = Config()
    print(f"| digits search ({cfg.search.generations} generations x {cfg.search.population}) | Ray workers "
          "| simplify processes | seconds | search s | proxy runs | full fine-tunes | runs/hour | individuals/hour "
          "| same-formula hits | same-mask hits | screened only | best fitness | driver share | canonical forms share "
          f"| workers idle | driver share at {GPU_PROXY_S} s a proxy run |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for screen in (True, False):
        for workers in (int(w) for w in args.digits_workers.split(",")):
            for processes in (int(p) for p in args.simplify_processes.split(",")):
                _digits_search(args, screen, workers, processes)


def _digits_search(args, screen: bool, workers: int, processes: int) -> None:
    cfg = Config()
    cfg = replace(cfg, proxy=replace(cfg.proxy, screen=screen),
                  run=replace(cfg.run, device=args.device, cache_dir=args.cache_dir or "", data_root=args.data_root,
                              simplify_processes=processes, workers=workers, threads=args.threads,
                              gpus_per_worker=args.gpus_per_worker if workers else 0.0))
    _canonical.cache_clear()  # every search starts cold, as its own process would
    clear_cache()  # sympy's
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = run_search(cfg, db_url=f"sqlite:///{d}/bench.db")
        dt = time.perf_counter() - t0
    k, sec = res.counters, res.seconds
    individuals = cfg.search.population * (cfg.search.generations + 1)
    best = max(h.best for h in res.history)
    driver = sec["search"] - sec["proxy"]  # the driver's own work, overlapping the workers' or not
    # idle: the share of the workers' time without a proxy run (the driver's work they waited for,
    # the end of each generation's last runs); a pool overlaps the driver's work with its runs
    idle = f"{1 - sec['worker'] / sec['capacity']:.1%}" if sec.get("capacity") else "-"
    # in this process nothing overlaps: the same driver beside a faster proxy
    gpu = f"{driver / (driver + k['evaluations'] * GPU_PROXY_S):.1%}" if not workers else "-"
    print(f"| racing {'on' if screen else 'off'} | {workers or 'in-process'} | {processes} | {dt:.1f} | "
          f"{sec['search']:.1f} | {k['evaluations']} | {k['full']} | {k['evaluations'] / dt * 3600:.0f} | "
          f"{individuals / dt * 3600:.0f} | {k['canonical_hits']} | {k['mask_hits']} | {k['screened_only']} | "
          f"{best:.4f} | {driver / sec['search']:.1%} | {sec['canonical'] / sec['search']:.1%} | {idle} | {gpu} |",
          flush=True)


def _cifar_proxy(train: str):
    return replace(load_config("configs/cifar10.toml").proxy, tasks=("cifar10-resnet20",), train=train)


def _cifar_setup(args, train: str):
    proxy = _cifar_proxy(train)
    ctx = TaskContext("cifar10-resnet20", proxy, data_root=args.data_root, cache_dir=args.cache_dir,
                      device=args.device)
    names = list(BASELINES)[: args.cifar_candidates]
    masker = TaskMasks.load("cifar10-resnet20", proxy.allocation, sorted({s for n in names for s in
                                                                          BASELINES[n].node.stats()}),
                            stat_images=proxy.stat_images, seed=proxy.data_seed, data_root=args.data_root,
                            cache_dir=args.cache_dir, device=args.device)
    # the masks are the driver's work, not the proxy's: made outside the timing
    masks = {n: masker(parse(BASELINES[n].expression)) for n in names}
    return ctx, masks


def _cifar_times(args, train: str, barrier=None) -> dict[str, tuple[list[float], list[float]]]:
    """Seconds and fitness of each baseline's screen and full proxy; with `barrier`, one of
    several concurrent one-thread workers (a Ray actor's setting), which start each stage together."""
    if barrier is not None:
        torch.set_num_threads(1)
    ctx, masks = _cifar_setup(args, train)
    contexts = {"cifar10-resnet20": ctx}

    def job(name: str, stage: str) -> Job:
        return Job(name, BASELINES[name].expression, stage, {"cifar10-resnet20": masks[name]})

    evaluate_job(contexts, job("l1", "full"))  # warm-up
    out = {}
    for stage in ("screen", "full"):
        if barrier is not None:
            barrier.wait()
        times, fits = [], []
        for n in masks:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            rec = evaluate_job(contexts, job(n, stage))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            fits.append(rec.fitness)
        out[stage] = (times, fits)
    return out


def _worker(args, train, barrier, queue):
    queue.put(_cifar_times(args, train, barrier))


def cifar(args):
    """Each of `--train`'s proxies in-process (torch's threads), then as `--workers` concurrent
    one-thread processes (how a search's Ray actors run, one per CPU): candidates/hour is then
    workers x 3600 / the median seconds a worker spends on one."""
    proxy = _cifar_proxy("pruned")  # what the header and racing read: the same for both kinds
    print(f"\n| CIFAR-10 ResNet-20 proxy ({args.cifar_candidates} baselines, ratio {proxy.ratio}, "
          f"{proxy.finetune_steps} steps of {proxy.batch_size}) | stage | median s | min s | max s | "
          "candidates/hour | mean fitness |\n|---|---|---|---|---|---|---|")
    for train in args.train.split(","):
        settings = [(f"in-process, {torch.get_num_threads()} threads", 1)]
        if args.workers > 1:
            settings.append((f"{args.workers} workers x 1 thread", args.workers))
        for label, n in settings:
            if n == 1:
                runs = [_cifar_times(args, train)]
            else:
                mp = multiprocessing.get_context("spawn")
                barrier, queue = mp.Barrier(n), mp.Queue()
                procs = [mp.Process(target=_worker, args=(args, train, barrier, queue)) for _ in range(n)]
                for p in procs:
                    p.start()
                runs = [queue.get() for _ in procs]
                for p in procs:
                    p.join()
            med = {}
            for stage in ("screen", "full"):
                times = [t for r in runs for t in r[stage][0]]
                fits = [f for r in runs for f in r[stage][1]]
                med[stage] = statistics.median(times)
                print(f"| {train}, {label} | {stage} | {med[stage]:.3f} | {min(times):.3f} | {max(times):.3f} | "
                      f"{n * 3600 / med[stage]:.0f} | {statistics.fmean(fits):.4f} |")
            mixed = med["screen"] + proxy.promote * med["full"]
            print(f"| {train}, {label} | racing (screen all, full for {proxy.promote:.0%}) | {mixed:.3f} | | | "
                  f"{n * 3600 / mixed:.0f} | |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--skip-cifar", action="store_true")
    ap.add_argument("--cifar-candidates", type=int, default=8)
    ap.add_argument("--train", default="pruned",
                    help="the CIFAR proxies to time: pruned, masked or both (masked,pruned)")
    ap.add_argument("--simplify-processes", default="1,2",
                    help="digits search: [run] simplify_processes to time, comma-separated")
    ap.add_argument("--digits-workers", default="0",
                    help="digits search: [run] workers to time, comma-separated (0: in-process; N: a Ray pool, "
                         "whose workers train while the driver breeds)")
    ap.add_argument("--threads", type=int, default=0,
                    help="digits search: [run] threads, torch's threads for the in-process proxy runs (0: torch's "
                         "default; 1 leaves a core of 2 to a simplify helper, as a GPU search's proxy leaves the CPU)")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0,
                    help="digits search on a Ray pool: [run] gpus_per_worker (0: one GPU each where there are "
                         "GPUs and --device is not cpu, else CPU actors)")
    ap.add_argument("--workers", type=int, default=1,
                    help="also time N concurrent one-thread workers (a search's Ray actors; CPU)")
    args = ap.parse_args()
    name = describe_device(args.device)
    print(f"device: {name}; torch {torch.__version__}\n")
    if not args.skip_digits:
        digits(args)
    if not args.skip_cifar:
        cifar(args)


if __name__ == "__main__":
    main()
