"""scripts/sync_logs.sh against a fake ssh that runs rsync's remote side on this machine."""

import os
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync (apt-get install rsync)")

FAKE_SSH = """#!/bin/sh
# called by rsync as: fake_ssh HOST rsync --server ...; host "down" is a node that went away
host=$1; shift
[ "$host" = down ] && { echo "ssh: connect to host down: Connection refused" >&2; exit 255; }
echo "$host" >> "$(dirname "$0")/hosts_seen"
exec sh -c "$*"
"""


def sync(tmp_path, host, remote):
    env = {**os.environ, "RSYNC_RSH": str(tmp_path / "fake_ssh"), "SYNC_ONCE": "1",
           "LOCAL_DIR": str(tmp_path / "home" / "logs")}
    return subprocess.run([os.path.join(ROOT, "scripts", "sync_logs.sh"), host, str(remote), "1"],
                          capture_output=True, text=True, env=env, timeout=60)


def test_sync_follows_the_node(tmp_path):
    (tmp_path / "fake_ssh").write_text(FAKE_SSH)
    (tmp_path / "fake_ssh").chmod(0o755)
    node = tmp_path / "node" / "gpt2"
    (node / "logs" / "run1").mkdir(parents=True)
    (node / "logs" / "run1" / "log.txt").write_text("0 train 10.9\n")
    (node / "checkpoints" / "run1").mkdir(parents=True)
    (node / "checkpoints" / "run1" / "step_000001.pt").write_bytes(b"big")
    home = tmp_path / "home" / "logs"

    out = sync(tmp_path, "node-a", node)
    assert out.returncode == 0 and "synced node-a:" in out.stdout
    assert (home / "run1" / "log.txt").read_text() == "0 train 10.9\n"
    assert not (tmp_path / "home" / "checkpoints").exists() and not list(home.rglob("*.pt"))

    # the node goes away: a clear message, the local copy stays
    out = sync(tmp_path, "down", node)
    assert out.returncode == 0 and "could not reach down" in out.stderr
    assert (home / "run1" / "log.txt").exists()

    # it comes back under a new address written into a file; new lines arrive, nothing is deleted
    (node / "logs" / "run1" / "log.txt").write_text("0 train 10.9\n1 train 10.1\n")
    (tmp_path / "host").write_text("node-b\n")
    out = sync(tmp_path, f"@{tmp_path / 'host'}", node)
    assert "synced node-b:" in out.stdout
    assert (home / "run1" / "log.txt").read_text().splitlines()[-1] == "1 train 10.1"
    assert (tmp_path / "hosts_seen").read_text().split() == ["node-a", "node-b"]


def test_usage():
    out = subprocess.run([os.path.join(ROOT, "scripts", "sync_logs.sh")], capture_output=True, text=True)
    assert out.returncode == 2 and "HOST [REMOTE_DIR] [INTERVAL]" in out.stdout
