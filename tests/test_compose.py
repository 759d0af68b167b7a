"""docker-compose.yml and the Dockerfile, checked without a Docker engine (this machine has
none): the file interpolates with the variables .env.example documents and refuses to start
without the secrets; services, volumes and dependencies refer to things that exist; every
command in it parses with the real `ray` and `evoprune` command lines; the database URL is one
evoprune connects with; the image installs every package the project declares.

What this cannot show is the containers running; the same roles (a head, workers that join it
with a token, the search's driver on the head) run for real in test_launcher.py and
test_cluster_faults.py."""
from __future__ import annotations

import re
import shlex
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
    assert {"db", "head", "worker", "gpu-worker"} <= set(services)
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
    for role in ("head", "worker", "gpu-worker"):
        env = services[role]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "0" * 64
    assert services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def _command(value) -> list[str]:
    return value if isinstance(value, list) else shlex.split(value)


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
    commands = [_command(s["command"]) for s in c["services"].values() if "command" in s]
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
