"""The cluster files: every one validates offline with Ray's own checks; and a real `ray up`,
`ray submit` of a tiny search scored on both nodes, `ray down`, on one machine: a private sshd
on 127.0.0.2 and 127.0.0.3 (Ray rewrites 127.0.0.1 to the outward address) with a key for root.

The live test touches no other Ray on the machine: the cluster runs in a temporary directory of
its own, and the `ray` the SSH sessions find first on PATH is a wrapper whose `stop` (which
`ray down` runs, and which would stop every Ray on the host) kills only that cluster."""
from __future__ import annotations

import copy
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from raycluster import HEAD, WORKER, _free_port, holding

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "evolve.yaml", *sorted((ROOT / "examples").glob("*.yaml"))]


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    c = prepare_config(copy.deepcopy(config))
    validate_config(c)
    return c


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_cluster_files_validate_with_rays_own_checks(path):
    config = yaml.safe_load(path.read_text())
    _validate(config)
    text = path.read_text()
    assert "scripts/evolve_cluster.py" in text and "pip install" in text and "~/evoprune" in text
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # every node presents one token
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in config["head_start_ray_commands"] if "ray start" in cmd)
    broken = {**config, "setup_comands": []}  # a typo: Ray's schema refuses unknown top-level keys
    with pytest.raises(Exception):
        _validate(broken)


def test_the_entry_script_runs_evolve_against_the_cluster(tmp_path, monkeypatch, capsys):
    """Without --address it asks for the Ray this node runs; with none running, one clear line."""
    monkeypatch.setenv("EVOPRUNE_PROJECT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["evolve_cluster.py", "--generations", "0", "--db", str(tmp_path / "x.db")])
    import runpy

    monkeypatch.setattr("evoprune.workers.evaluator._cluster_file", lambda: None)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "scripts" / "evolve_cluster.py"), run_name="__main__")
    assert e.value.code == 2 and "no Ray runs on this machine" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()


# --------------------------------------------------------------------------- the live cluster
MARK = "# evoprune-launcher-test"


def _why_not_live() -> str | None:
    if not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
        return "openssh-server is not installed (apt-get install openssh-server rsync)"
    if not shutil.which("rsync"):
        return "rsync is not installed"
    if os.geteuid() != 0:
        return "the test logs in as root over SSH"
    for ip in (HEAD, WORKER):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as sshd does: TIME_WAIT is no owner
            try:
                s.bind((ip, 22))
            except OSError as e:
                return f"port 22 on {ip} is taken ({e})"
    return None


STOP = """import sys
sys.path.insert(0, {tests!r})
from test_launcher import _kill_holding
_kill_holding({prefix!r})
"""


def _kill_holding(prefix: str) -> None:
    for pid in holding(prefix):
        try:
            os.kill(pid, 9)
        except OSError:
            pass


class Launcher:
    """sshd, keys, a `ray` wrapper, a cluster file derived from evolve.yaml."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="epl", dir="/tmp"))  # short: Ray's socket paths are limited
        self.port, self.client = _free_port(26600), _free_port(20300)
        self.ray = str(Path(sys.executable).with_name("ray"))
        self.sshd = None

    def ensure_token(self) -> None:
        """The cluster file mounts ~/.ray/auth_token on every node: as for a user, it must exist
        before `ray up` (the first local `ray.init` makes one, as this command does)."""
        if not (Path.home() / ".ray" / "auth_token").is_file():
            subprocess.run([self.ray, "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60)

    def start_sshd(self) -> None:
        t = self.tmp
        for key in ("key", "host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(t / key)], check=True)
        shutil.copy(t / "key.pub", t / "authorized_keys")
        (t / "sshd_config").write_text(
            f"Port 22\nListenAddress {HEAD}\nListenAddress {WORKER}\nHostKey {t / 'host_key'}\n"
            f"AuthorizedKeysFile {t / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            f"PasswordAuthentication no\nStrictModes no\nPidFile {t / 'sshd.pid'}\nUsePAM no\n"
            "Subsystem sftp internal-sftp\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.sshd = subprocess.Popen([sshd, "-D", "-e", "-f", str(t / "sshd_config")], stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection((HEAD, 22), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("sshd did not start")

    def wrap_ray(self) -> None:
        """SSH sessions run `bash --login -i`: put a `ray` first on their PATH whose `stop`
        kills only this cluster's processes, then the project's environment."""
        bin_dir = self.tmp / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "ray"
        (self.tmp / "stop.py").write_text(STOP.format(tests=str(ROOT / "tests"), prefix=str(self.tmp / "raytmp")))
        wrapper.write_text(f'#!/bin/sh\nif [ "$1" = "stop" ]; then exec {sys.executable} {self.tmp}/stop.py; fi\n'
                           f'exec {self.ray} "$@"\n')
        wrapper.chmod(0o755)
        with open(Path.home() / ".bashrc", "a") as f:
            f.write(f'\nexport PATH="{bin_dir}:{Path(sys.executable).parent}:$PATH" {MARK}\n')

    def cluster_file(self) -> Path:
        c = yaml.safe_load((ROOT / "evolve.yaml").read_text())
        temp = self.tmp / "raytmp"  # the Ray temp dir: every process of the cluster names it
        c.update(cluster_name=f"test{self.port}", max_workers=1,
                 provider={"type": "local", "head_ip": HEAD, "worker_ips": [WORKER]},
                 auth={"ssh_user": "root", "ssh_private_key": str(self.tmp / "key")},
                 file_mounts={"~/.ray/auth_token": "~/.ray/auth_token",
                              str(self.tmp / "project"): str(ROOT / "scripts")},
                 setup_commands=[],  # evoprune is installed here already (the real file installs it)
                 head_start_ray_commands=[
                     f"ray stop; RAY_AUTH_MODE=token ray start --head --node-ip-address={HEAD} --port={self.port} "
                     "--num-cpus=1 "
                     f"--autoscaling-config=~/ray_bootstrap_config.yaml --ray-client-server-port={self.client} "
                     f"--include-dashboard=false --disable-usage-stats --temp-dir={temp}"],
                 worker_start_ray_commands=[
                     f"RAY_AUTH_MODE=token ray start --address={HEAD}:{self.port} --node-ip-address={WORKER} "
                     f"--num-cpus=1 --disable-usage-stats --temp-dir={temp}"])
        _validate(c)
        path = self.tmp / "cluster.yaml"
        path.write_text(yaml.safe_dump(c))
        return path

    def nodes(self) -> int:
        out = subprocess.run([self.ray, "status", f"--address={HEAD}:{self.port}"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "RAY_AUTH_MODE": "token"}).stdout
        active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
        return sum(int(line.split()[0]) for line in active.splitlines() if line.strip()[:1].isdigit())

    def cleanup(self) -> None:
        _kill_holding(str(self.tmp / "raytmp"))
        if self.sshd is not None:
            self.sshd.kill()
            self.sshd.wait()
        rc = Path.home() / ".bashrc"
        rc.write_text("".join(line for line in rc.read_text().splitlines(keepends=True) if MARK not in line))
        shutil.rmtree(self.tmp, ignore_errors=True)


CONFIG = """
[search]
population = 6
generations = 1
seed = 3
seeds = ["l1", "bn_scale", "fpgm"]
validation_orders = 0

[proxy]
tasks = ["digits-cnn"]
finetune_steps = 40
recalibrate_images = 128
stat_images = 128
"""


@pytest.mark.slow
@pytest.mark.skipif(_why_not_live() is not None, reason=_why_not_live() or "")
def test_ray_up_submit_down_on_two_loopback_nodes(digits_pretrained, cache_dir, tmp_path):
    launcher = Launcher()
    env = {**os.environ, "RAY_UP_enable_autoscaler_v2": "0"}  # v2 does not launch the listed local workers
    try:
        launcher.ensure_token()
        launcher.start_sshd()
        launcher.wrap_ray()
        cluster = launcher.cluster_file()
        up = subprocess.run([launcher.ray, "up", "-y", "--no-config-cache", str(cluster)], capture_output=True,
                            text=True, timeout=600, env=env)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        deadline = time.time() + 180  # the head's autoscaler starts the worker over SSH
        while time.time() < deadline and launcher.nodes() < 2:
            time.sleep(2)
        assert launcher.nodes() == 2
        cfg = tmp_path / "tiny.toml"
        cfg.write_text(CONFIG)
        db = tmp_path / "cluster.db"
        submit = subprocess.run([launcher.ray, "submit", str(cluster), str(ROOT / "scripts" / "evolve_cluster.py"),
                                 "--", "--config", str(cfg), "--db", str(db), "--cache-dir", str(cache_dir),
                                 "--device", "cpu", "--address", f"{HEAD}:{launcher.port}", "--workers", "2"],
                                capture_output=True, text=True, timeout=600, env=env)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        with sqlite3.connect(db) as c:
            assert c.execute("SELECT status FROM runs").fetchone()[0] == "finished"
            workers = {w for (w,) in c.execute("SELECT DISTINCT worker FROM evaluations")}
        assert any(HEAD in w for w in workers) and any(WORKER in w for w in workers), workers
        down = subprocess.run([launcher.ray, "down", "-y", str(cluster)], capture_output=True, text=True,
                              timeout=300, env=env)
        assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
        time.sleep(2)
        assert not holding(str(launcher.tmp / "raytmp"))  # ray down stopped every process of this cluster
    finally:
        launcher.cleanup()
