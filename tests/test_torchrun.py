"""label.py and evaluate.py under torchrun (gloo, CPU) against one process, the oracle: the same
label set row for row, the same table; and a run killed in one rank resumes, at the same or another
world size, to exactly that label set."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT

import r2r

# 8 chunks, 4 to each of 2 ranks
LABEL = ["label.py", "--limit", "16", "--batch-size", "2"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def run(argv, nproc=1, **kw):
    """A script as one process, or under torchrun with `nproc` processes (a free port of
    its own)."""
    launch = [sys.executable] + (
        ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        if nproc > 1
        else []
    )
    return subprocess.Popen(
        launch + argv,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return out


def rows(folder):
    """Every labeled position as a comparable tuple, sorted: the label set."""
    ds = r2r.load_labels(str(folder))[1]
    return sorted(
        zip(
            ds["prompt_id"],
            ds["position"],
            ds["slm_token"],
            ds["llm_token"],
            ds["kind"],
            map(tuple, ds["hidden"]),
            map(tuple, ds["topk"]),
        )
    )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    folder = tmp_path_factory.mktemp("labels") / "one"
    finish(run(LABEL + ["--out", str(folder)]))
    return folder, rows(folder)


def test_two_ranks_label_what_one_process_labels(one_process, tmp_path):
    out = finish(run(LABEL + ["--out", str(tmp_path / "two")], nproc=2))
    assert rows(tmp_path / "two") == one_process[1]
    assert out.count("positions from 16 responses") == 1, (
        "the summary is printed once, over every rank's shards"
    )
    assert sorted(os.listdir(tmp_path / "two" / "shards")) == sorted(
        os.listdir(one_process[0] / "shards")
    )


def kill_one_rank_midway(folder):
    """Start two ranks and kill one of them once the first shard is written;
    -> shards left behind."""
    proc = run(LABEL + ["--out", str(folder)], nproc=2, start_new_session=True)
    shards = folder / "shards"
    while not (shards.is_dir() and any(not s.endswith(".tmp") for s in os.listdir(shards))):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    workers = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "label.py" in " ".join(p.cmdline())
    ]
    # one rank dies; torchrun then stops the other
    workers[-1].send_signal(signal.SIGKILL)
    proc.communicate(timeout=600)
    assert proc.returncode != 0
    return [s for s in os.listdir(shards) if not s.endswith(".tmp")]


@pytest.mark.parametrize("nproc", [2, 1], ids=["same-command", "another-world-size"])
def test_a_killed_rank_resumes_to_the_same_labels(one_process, tmp_path, nproc):
    left = kill_one_rank_midway(tmp_path / "out")
    assert 0 < len(left) < 8, "the test needs a run killed mid-way"
    finish(run(LABEL + ["--out", str(tmp_path / "out")], nproc=nproc))
    assert rows(tmp_path / "out") == one_process[1]  # nothing lost, nothing twice
    assert sorted(os.listdir(tmp_path / "out" / "shards")) == sorted(
        os.listdir(one_process[0] / "shards")
    )


def test_two_ranks_evaluate_prints_the_one_process_table():
    """The same table but for the random baseline's rows, whose one generator draws in each
    process's own decode order (as at another --batch-size)."""
    argv = ["evaluate.py", "--limit", "10", "--thresholds", "0.3", "--batch-size", "2"]
    one, two = finish(run(argv)), finish(run(argv, nproc=2))

    def table(out):
        return [
            line
            for line in out.splitlines()
            if line.startswith("|") and not line.startswith("| random")
        ]

    assert len(table(one)) == 8 and table(two) == table(one)
