"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the file interpolates
with the variables .env.example documents and refuses to start
without the secrets; services, volumes and dependencies refer to things that exist; every
command in it parses with the real `ray` and `evoprune` command lines; the database URL is one
evoprune connects with; the image installs every package the project declares.

Where a Docker engine answers, the last test runs the stack for real (build, db + head + a
worker, the search job, the run read back from PostgreSQL); elsewhere it is skipped with the
reason. The same roles (a head, workers that join it with a token, the search's driver on a Ray
node) run for real in test_launcher.py and test_cluster_faults.py in any case."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$\$")


class Missing(Exception):
    pass


def interpolate(value, env: dict[str, str]):
    """Compose's variable syntax: ${X}, ${X:-default}, ${X-default}, ${X:?error}, ${X?error}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        have = env.get(name)
        unset = have is None or (op is not None and op.startswith(":") and have == "")
        if op and op.endswith("?") and unset:
            raise Missing(f"{name}: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        return have or ""

    return VAR.sub(one, value)


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def compose(env: dict[str, str]) -> dict:
    return interpolate(yaml.safe_load((ROOT / "docker-compose.yml").read_text()), env)


FILLED = {**env_example(), "RAY_AUTH_TOKEN": "0" * 64, "POSTGRES_PASSWORD": "pw"}


def test_every_variable_is_documented_and_the_secrets_are_required():
    text = (ROOT / "docker-compose.yml").read_text()
    used = {m.group(1) for m in VAR.finditer(text) if m.group(1)}
    assert used <= set(env_example()), used - set(env_example())
    for secret in ("RAY_AUTH_TOKEN", "POSTGRES_PASSWORD"):
        with pytest.raises(Missing, match=secret):
            compose({**FILLED, secret: ""})
    c = compose(FILLED)
    assert c["services"]["head"]["environment"]["RAY_AUTH_TOKEN"] == "0" * 64


def test_services_volumes_and_dependencies_refer_to_what_exists():
    c = compose(FILLED)
    services, volumes = c["services"], set(c.get("volumes") or {})
    assert {"db", "head", "worker", "gpu-worker", "search"} <= set(services)
    assert services["search"]["restart"] == "no"  # a job, not a daemon
    for name, s in services.items():
        assert "image" in s or "build" in s, name
        if "build" in s:
            assert (ROOT / s["build"] / "Dockerfile").is_file()
        for dep in s.get("depends_on", {}):
            assert dep in services, (name, dep)
            cond = s["depends_on"][dep]["condition"]
            assert cond != "service_healthy" or "healthcheck" in services[dep], (name, dep)
        for v in s.get("volumes", []):
            source = v.split(":", 1)[0]
            assert source.startswith((".", "/")) or source in volumes, (name, source)
    # the roles that run Ray share the image, the token and the mode
    for role in ("head", "worker", "gpu-worker", "search"):
        env = services[role]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "0" * 64
    assert services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def _commands(value) -> list[list[str]]:
    """A service's command lines; a `sh -c` script is cut at `&&` (and `exec` dropped)."""
    argv = value if isinstance(value, list) else shlex.split(value)
    if argv[:2] != ["sh", "-c"]:
        return [argv]
    return [[a for a in shlex.split(part) if a != "exec"] for part in argv[2].split("&&")]


def test_every_command_parses_with_the_real_command_lines():
    """click parses (and validates) arguments in make_context without running the command."""
    from ray.scripts.scripts import cli as ray_cli
    from typer.main import get_command

    from evoprune.cli import app

    def parses(argv: list[str]) -> None:
        cmd, name, args, parent = {"ray": ray_cli, "evoprune": get_command(app)}[argv[0]], argv[0], argv[1:], None
        while True:
            ctx = cmd.make_context(name, args, parent=parent)
            if not hasattr(cmd, "resolve_command"):  # a command, not a group (typer vendors its own click)
                return
            name, cmd, args = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
            parent = ctx

    c = compose(FILLED)
    commands = [cmd for s in c["services"].values() if "command" in s for cmd in _commands(s["command"])]
    commands += [s["healthcheck"]["test"][1:] for s in c["services"].values() if "healthcheck" in s
                 and s["healthcheck"]["test"][1] in ("ray", "evoprune")]
    header = [line.split("exec head", 1)[1].split("#")[0] for line in
              (ROOT / "docker-compose.yml").read_text().splitlines() if "docker compose exec head" in line]
    commands += [shlex.split(h) for h in header]
    assert any(cmd[:2] == ["evoprune", "evolve"] for cmd in commands)
    for argv in commands:
        parses(argv)
        for arg in argv:  # files named relative to the image's working directory exist
            if arg.startswith("configs/"):
                assert (ROOT / arg).is_file(), arg
    with pytest.raises(Exception):
        parses(["ray", "start", "--head", "--prot=6379"])  # a typo does not parse


def test_the_database_url_is_one_evoprune_connects_with():
    from sqlalchemy.engine import make_url

    from evoprune.db import store

    url = compose(FILLED)["services"]["head"]["environment"]["EVOPRUNE_DB"]
    parsed = make_url(store.resolve_url(url, None))
    assert parsed.drivername == "postgresql+psycopg" and parsed.host == "db" and parsed.password == "pw"
    db = compose(FILLED)["services"]["db"]["environment"]
    assert (parsed.username, parsed.database) == (db["POSTGRES_USER"], db["POSTGRES_DB"])


def test_the_image_installs_every_package_the_project_declares():
    docker = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(project["tool"]["setuptools"]["package-dir"].values())
    made = re.search(r"mkdir -p ([^&\n]+)", docker).group(1).split()
    assert package_dirs <= set(made), package_dirs - set(made)  # the dependency layer builds
    assert "postgres" in project["project"]["optional-dependencies"] and "'.[postgres]'" in docker
    for line in docker.splitlines():
        if line.startswith("COPY ") and not line.startswith("COPY . "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "*.db"} <= set(ignored)


def _engine() -> str | None:
    """Why the live test cannot run here, or None."""
    if not shutil.which("docker"):
        return "no docker command"
    r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if r.returncode:
        return "no docker compose plugin"
    r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=60)
    if r.returncode or not r.stdout.strip():
        return f"no Docker engine answers ({(r.stderr.strip().splitlines() or ['?'])[-1][:120]})"
    return None


@pytest.mark.slow
def test_the_stack_runs_a_search_into_postgresql(tmp_path):
    if why := _engine():
        pytest.skip(why)
    import secrets

    env_file = tmp_path / ".env"
    env_file.write_text(f"RAY_AUTH_TOKEN={secrets.token_hex(32)}\nPOSTGRES_PASSWORD={secrets.token_hex(8)}\n"
                        f"EVOPRUNE_DATA={tmp_path}\nEVOPRUNE_WORKERS=1\nEVOPRUNE_CONFIG=configs/digits.toml\n")
    base = ["docker", "compose", "--project-directory", str(ROOT), "--env-file", str(env_file),
            "-p", f"evoprune-test-{secrets.token_hex(3)}"]

    def dc(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout)

    try:
        up = dc("up", "-d", "--build", "--wait", "db", "head", "worker")
        assert up.returncode == 0, up.stderr[-3000:]
        job = dc("--profile", "search", "run", "--rm", "search", "sh", "-c",
                 "ray start --address=head:6379 --num-cpus=0 --disable-usage-stats && "
                 "evoprune evolve --generations 1 --address auto --workers auto")
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        runs = dc("exec", "-T", "head", "evoprune", "runs", "--json")
        assert runs.returncode == 0, runs.stderr[-2000:]
        assert [r["status"] for r in json.loads(runs.stdout)] == ["finished"]
    finally:
        dc("--profile", "search", "down", "-v", "--remove-orphans", timeout=600)
