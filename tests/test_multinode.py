"""A real 2-node job on one machine: two network namespaces ("nodes") joined by a veth pair, one
`launch/run_multinode.sh` (torchrun, c10d rendezvous, --nnodes=2) per node, gloo over the veth.
The losses must equal the single-process run.

Needs `ip netns` (iproute2) and the right to create namespaces (root / CAP_NET_ADMIN); the test is
skipped, with the reason, only when that is unavailable. Addresses come from the benchmarking
range 198.18.0.0/15 (RFC 2544) and exist only inside the two namespaces, which are deleted in a
`finally` (taking the veth pair with them).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from megatiny.testing import free_port
from tests.test_train import REPO, VOCAB, make_corpus, run_training, tiny_config

ADDRS = ("198.18.0.1", "198.18.0.2")


def _sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"mtprobe{os.getpid()}"
    r = _sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip() or r.stdout.strip()}"
    _sh("ip", "netns", "del", probe, check=False)
    return None


def _setup(names):
    """Two namespaces, a veth pair between them, an address and lo on each side."""
    a, b = names
    va, vb = f"{a}v", f"{b}v"
    for ns in names:
        _sh("ip", "netns", "add", ns)
    _sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
    for ns, dev, addr in ((a, va, ADDRS[0]), (b, vb, ADDRS[1])):
        _sh("ip", "link", "set", dev, "netns", ns)
        _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        _sh("ip", "-n", ns, "link", "set", dev, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
    return va, vb


@pytest.mark.slow
def test_two_node_job_matches_single_node(tmp_path):
    reason = _netns_unavailable()
    if reason:
        pytest.skip(f"cannot create network namespaces: {reason}")
    prefix = make_corpus(tmp_path)
    overrides = [
        f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2", "model.max_seq_len=32",
        f"data.path={prefix}", "data.tokenizer=null", "data.seq_length=16", "data.split=90,10,0",
        "train.steps=4", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.lr=1e-2", "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=0",
        "train.eval_iters=2", "train.progress_bar=false", "train.tensorboard=false",
    ]  # fmt: skip
    # Single node, one process: tp=1, dp=1 (micro 2 x accumulation 2).
    ref = run_training(
        tiny_config(prefix, tmp_path / "single", "train.steps=4", "train.global_batch_size=4")
    )[0]["losses"]

    names = (f"mta{os.getpid()}", f"mtb{os.getpid()}")
    port = free_port()
    procs = []
    try:
        devs = _setup(names)
        run_dir = tmp_path / "two_nodes"
        for node, (ns, dev, addr) in enumerate(zip(names, devs, ADDRS)):
            env = {
                **os.environ, "NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": ADDRS[0],
                "MASTER_PORT": str(port), "NPROC": "1", "LOCAL_ADDR": addr,
                "GLOO_SOCKET_IFNAME": dev, "RDZV_ID": f"test{os.getpid()}",
                "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            }  # fmt: skip
            # Two nodes x one rank, tp=2: every tensor-parallel collective crosses the veth.
            cmd = ["ip", "netns", "exec", ns, os.path.join(REPO, "launch", "run_multinode.sh"),
                   "--config", os.path.join(REPO, "launch/configs/tiny-cpu.yaml"), *overrides,
                   f"train.run_dir={run_dir}", "parallel.tp=2"]  # fmt: skip
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )  # fmt: skip
            )
        outputs = []
        for p in procs:
            out, _ = p.communicate(timeout=300)
            outputs.append(out)
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out[-4000:]
        records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        losses = [r["loss"] for r in records if "split" not in r]
        np.testing.assert_allclose(losses, ref, rtol=2e-5, atol=2e-5)
        assert "done: 4 steps" in "".join(outputs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in names:
            _sh("ip", "netns", "del", ns, check=False)
