"""The entry script of `ray submit evolve.yaml scripts/evolve_cluster.py -- ARGS`.

`ray submit` copies this file to the head and runs it there with the login shell's python;
it runs `evoprune evolve ARGS` from the project folder the cluster file mounts (~/evoprune,
else the current folder), against the cluster it runs on: Ray workers on every node (one per
CPU, or GPU), unless ARGS say otherwise (--workers, --address).
"""
import os
import sys
from pathlib import Path


def main() -> int:
    project = Path(os.environ.get("EVOPRUNE_PROJECT", Path.home() / "evoprune"))
    if project.is_dir():
        os.chdir(project)
    try:
        from evoprune.cli import main as evoprune
    except ImportError:
        print(f"error: evoprune is not installed for {sys.executable}; the cluster file's setup commands "
              "install it and put its virtual environment first on PATH", file=sys.stderr)
        return 2
    args = sys.argv[1:]
    if "--address" not in args:
        args += ["--address", "auto"]  # the Ray this node runs (ray start wrote its address)
    return evoprune(["evolve", *args])


if __name__ == "__main__":
    sys.exit(main())
