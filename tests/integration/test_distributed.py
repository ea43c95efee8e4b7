"""Two-process CPU DDP (gloo): chains split across ranks, gathered, the same history everywhere."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_ddp_splits_chains_and_every_rank_holds_the_same_history(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "tests.integration.ddp_run", str(tmp_path)]
    completed = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == [0, 15, 30]
    # Between sparse estimates L(w*) is read (at step 25), and every rank's detector holds the same points.
    assert ranks[0]["sparse_steps"] == ranks[1]["sparse_steps"] == [0, 30]
    assert [step for step, _ in ranks[0]["sparse_fixed_loss"]] == [0, 25, 30]
    assert ranks[0]["sparse_fixed_loss"] == ranks[1]["sparse_fixed_loss"]
    assert ranks[0]["llc"] == ranks[1]["llc"]
    assert ranks[0]["callback_metric"] == ranks[1]["callback_metric"]
    assert ranks[0]["loss_detector"] == ranks[1]["loss_detector"]  # TransitionMonitor decides from the mean over ranks
    assert ranks[0]["loss_detector"]["differences"]  # it saw the (rank-averaged) losses
    for per_chain in ranks[0]["per_chain"]:
        assert len(per_chain) == 3  # 2 chains on rank 0 and 1 on rank 1, gathered
        assert len(set(per_chain)) == 3  # distinct seeds per rank: no duplicated chains
