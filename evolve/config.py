"""Search configuration: typed, frozen, validated once, stored with the run.

A config file is TOML with up to three tables, every key optional:

    [search]   the GP engine (SearchConfig)
    [proxy]    how a candidate is scored (evoprune.workers.proxy.ProxyConfig)
    [run]      where it runs and what it writes (RunConfig)
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from evoprune.errors import EvopruneError
from evoprune.tomlfiles import read_toml
from evoprune.primitives.baselines import BASELINES
from evoprune.primitives.ops import OPS
from evoprune.primitives.stats import STATS
from evoprune.workers.proxy import ProxyConfig

MAX_POPULATION = 10_000
MAX_HEIGHT = 17
MAX_SIZE = 500
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
DEFAULT_SEEDS = ("l1", "l2", "bn_scale", "fpgm", "taylor", "apoz", "pfp", "fisher", "symdiv", "etpf_a")


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    population: int = 32  # individuals per generation
    generations: int = 12  # generations after the initial one (the default search improved on its
    #                        best seeded baseline after generation 0 on 4 of 5 seeds in 12; see RESULTS.md)
    seed: int = 0  # the run's random stream (DEAP uses Python's random)
    init_min_depth: int = 1  # ramped half-and-half: tree depths of the initial population
    init_max_depth: int = 4
    max_height: int = 8  # bloat control: offspring taller than this are replaced by a parent
    max_size: int = 40  # bloat control: offspring with more nodes than this likewise
    tournament: int = 3  # tournament size of selection
    elites: int = 2  # best individuals copied unchanged into the next generation
    p_crossover: float = 0.6  # share of offspring made by subtree crossover
    p_mutation: float = 0.35  # share made by mutation (the rest are copies)
    mutation_weights: tuple[float, float, float, float] = (0.4, 0.2, 0.2, 0.2)  # uniform subtree, node
    #                                   replacement, shrink, ephemeral-constant tweak
    parsimony: float = 0.002  # selection fitness = fitness - parsimony * size
    validation_orders: int = 5  # fresh data orders the finalists and baselines are validated on (0: none)
    unique_retries: int = 10  # a child already in the next population is bred again up to this often
    #                            (0 allows copies; with copies the default search converged in 2 generations)
    hall_of_fame: int = 10  # best distinct formulas kept
    seeds: tuple[str, ...] = DEFAULT_SEEDS  # put into the initial population: baseline names, and
    #                                          formulas of your own as "expr:FORMULA" (prefix or infix)
    stats: tuple[str, ...] = ()  # statistics the search may use (empty: all)
    ops: tuple[str, ...] = ()  # operators it may use (empty: all)

    def __post_init__(self):
        checks = [
            (self.population >= 4, "population must be >= 4"),
            (self.population <= MAX_POPULATION, f"population must be <= {MAX_POPULATION} (a larger one outgrows "
             "the driver's memory and every generation's time: run several searches)"),
            (self.generations >= 0, "generations must be >= 0"),
            (self.generations <= 100_000, "generations must be <= 100000"),
            (1 <= self.init_min_depth <= self.init_max_depth, "need 1 <= init_min_depth <= init_max_depth"),
            (self.max_height >= self.init_max_depth + 1, "max_height must exceed init_max_depth"),
            (self.max_height <= MAX_HEIGHT, f"max_height must be <= {MAX_HEIGHT} (Koza's limit: a full tree of "
             "depth d has up to 2^d nodes, and deeper trees only bloat)"),
            (self.max_size >= 3, "max_size must be >= 3"),
            (self.max_size <= MAX_SIZE, f"max_size must be <= {MAX_SIZE} (larger formulas are neither simplified "
             "nor readable)"),
            (2 <= self.tournament <= self.population, "tournament must be in [2, population]"),
            (0 <= self.elites < self.population, "elites must be in [0, population)"),
            (0 <= self.p_crossover and 0 <= self.p_mutation and self.p_crossover + self.p_mutation <= 1,
             "p_crossover + p_mutation must be in [0, 1]"),
            (len(self.mutation_weights) == 4 and all(math.isfinite(w) and w >= 0 for w in self.mutation_weights)
             and sum(self.mutation_weights) > 0, "mutation_weights: four finite non-negative numbers, not all 0"),
            (0 <= self.parsimony <= 1, "parsimony must be in [0, 1] (fitness is in [0, 1]: more than 1 per node "
             "ranks formulas by size alone)"),
            (0 <= self.unique_retries <= 1000, "unique_retries must be in [0, 1000]"),
            (self.validation_orders == 0 or 2 <= self.validation_orders <= 100,
             "validation_orders must be 0 (no validation) or in [2, 100] (a CI needs two)"),
            (1 <= self.hall_of_fame <= 1000, "hall_of_fame must be in [1, 1000]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise EvopruneError(f"[search] {msg}")
        named = [n for n in self.seeds if not n.startswith("expr:")]
        for kind, names, known in (("seeds", named, BASELINES), ("stats", self.stats, STATS),
                                   ("ops", self.ops, OPS)):
            if bad := [n for n in names if n not in known]:
                raise EvopruneError(f"[search] {kind}: unknown {bad}; known: {', '.join(known)}"
                                    + (" (or expr:FORMULA, a formula of your own)" if kind == "seeds" else ""))
        self.seed_formulas()

    def seed_formulas(self) -> list[str]:
        """The seeds in prefix form, in order: baselines' expressions and the user's `expr:` formulas,
        each checked against this search space (its statistics, operators and size limits)."""
        from evoprune.primitives.infix import read_formula

        out = []
        for seed in self.seeds:
            if not seed.startswith("expr:"):
                out.append(BASELINES[seed].expression)
                continue
            try:
                node = read_formula(seed[5:])
            except EvopruneError as e:
                raise EvopruneError(f"[search] seeds: {seed!r}: {e}") from None
            names = {n.name for n in node.walk() if not n.is_const}
            if outside := sorted(names - set(self.stat_names) - set(self.op_names)):
                raise EvopruneError(f"[search] seeds: {seed!r} uses {outside}, which this search's stats and ops "
                                    "leave out")
            if node.depth - 1 > self.max_height or node.size > self.max_size:  # DEAP's height: a leaf is 0
                raise EvopruneError(f"[search] seeds: {seed!r} has height {node.depth - 1} and size {node.size}; "
                                    f"max_height is {self.max_height} and max_size {self.max_size}")
            out.append(str(node))
        return out

    @property
    def stat_names(self) -> list[str]:
        return list(self.stats or STATS)

    @property
    def op_names(self) -> list[str]:
        return list(self.ops or OPS)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    db: str = "sqlite:///evoprune.db"  # SQLAlchemy URL (or $EVOPRUNE_DB); SQLite file in the working directory
    workers: int = 0  # Ray actors; 0 = evaluate in this process; -1 = every GPU (or CPU) the cluster has
    gpus_per_worker: float = 0.0  # e.g. 0.25 puts four actors on one GPU
    device: str = "auto"  # auto, cpu, cuda
    data_root: str = ""  # else --data-root / $EVOPRUNE_DATA_ROOT / ./data
    cache_dir: str = ""  # pretrained-model cache, else $EVOPRUNE_CACHE / ~/.cache/evoprune
    tasks_file: str = ""  # extra task definitions
    address: str = ""  # the Ray cluster to join (else $RAY_ADDRESS, else a `ray start` on this machine)
    threads: int = 0  # torch threads of an evaluating process: 0 = torch's default in-process, 1 per Ray actor
    placement_timeout_s: float = 120.0  # with every Ray worker lost, how long to wait for one before failing
    simplify_processes: int = 0  # processes making a generation's canonical forms (sympy); 0: auto; 1: the driver
    time_limit: str = ""  # e.g. "90m", "2h", "1h30m": no generation starts that would end past it ("": none)

    @property
    def time_limit_s(self) -> float | None:
        return duration_s(self.time_limit, "[run] time_limit") if self.time_limit else None

    def __post_init__(self):
        self.time_limit_s  # a bad duration is refused with the config
        if not 0 <= self.threads <= 256:
            raise EvopruneError("[run] threads must be in [0, 256]")
        if not 0 <= self.simplify_processes <= 256:
            raise EvopruneError("[run] simplify_processes must be in [0, 256] (0: auto)")
        if not 1 <= self.placement_timeout_s <= 86_400:
            raise EvopruneError("[run] placement_timeout_s must be in [1, 86400]")
        if not -1 <= self.workers <= 10_000:
            raise EvopruneError("[run] workers must be in [0, 10000], or -1 for all the cluster offers")
        if not 0 <= self.gpus_per_worker <= 8:
            raise EvopruneError("[run] gpus_per_worker must be in [0, 8]")
        if not DEVICE.fullmatch(self.device):
            raise EvopruneError(f"[run] device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class Config:
    search: SearchConfig = field(default_factory=SearchConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_json(self) -> str:
        return json.dumps({"search": asdict(self.search), "proxy": asdict(self.proxy), "run": asdict(self.run)},
                          sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "Config":
        if not isinstance(d, dict):
            raise EvopruneError(f"{source}: expected tables [search], [proxy], [run]")
        if extra := set(d) - {"search", "proxy", "run"}:
            raise EvopruneError(f"{source}: unknown tables {sorted(extra)} (allowed: search, proxy, run)")
        try:
            return cls(search=_build(SearchConfig, d.get("search", {}), "search"),
                       proxy=_build(ProxyConfig, d.get("proxy", {}), "proxy"),
                       run=_build(RunConfig, d.get("run", {}), "run"))
        except EvopruneError as e:
            raise EvopruneError(f"{source}: {e}") from None


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


def duration_s(text: str, where: str) -> float:
    """Seconds in a duration as people write one: "90m", "2h", "1h30m", "45s", "3600" (seconds);
    more than 0 and at most a year."""
    m = _DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if not m or not any(m.groups()):
        raise EvopruneError(f"{where} must be a duration such as 90m, 2h, 1h30m or 45s, got {text!r}"[:200])
    h, mins, sec = (float(g) if g else 0.0 for g in m.groups())
    total = h * 3600 + mins * 60 + sec
    if not 0 < total <= 365 * 86400:
        raise EvopruneError(f"{where} must be more than 0 and at most a year, got {text!r}")
    return total


def _value(v, default, where: str):
    """`v` checked against the type of the field's default (lists element by element; numbers
    finite: TOML's inf and nan are never a setting)."""
    if isinstance(default, tuple):
        if not isinstance(v, (list, tuple)):
            raise EvopruneError(f"{where} must be a list")
        item = default[0] if default else ""  # an empty default is a list of names
        return tuple(_value(x, item, f"{where}[{i}]") for i, x in enumerate(v))
    if isinstance(default, (bool, str)):
        if not isinstance(v, type(default)):
            raise EvopruneError(f"{where} must be a {type(default).__name__}, got {v!r}"[:200])
        return v
    if isinstance(default, (int, float)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(default, int)
                                                                       and not isinstance(v, int)):
            raise EvopruneError(f"{where} must be a {type(default).__name__}, got {v!r}"[:200])
        if not math.isfinite(v):
            raise EvopruneError(f"{where} must be a finite number, got {v!r}")
    return v


def _build(cls, d: dict, table: str):
    if not isinstance(d, dict):
        raise EvopruneError(f"[{table}] must be a table")
    known = {f.name: f for f in fields(cls)}
    if extra := set(d) - set(known):
        raise EvopruneError(f"[{table}] unknown keys {sorted(extra)} (allowed: {sorted(known)})")
    default = cls()
    return cls(**{k: _value(v, getattr(default, k), f"[{table}] {k}") for k, v in d.items()})


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    return Config.from_dict(read_toml(path, "config file"), str(path))
