"""torch.distributed: two CPU processes (gloo, launched by torchrun) against one process.

Importance passes shard whole batches and sum them (equal up to float summation); SSD's result is the one
process's; repair and fine-tuning split every batch across the ranks and average the gradients (equal within
float tolerance); rank 0 alone writes, and `excise unlearn` under torchrun leaves one output folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import excise.distributed as dist_mod

HERE = Path(__file__).parent
WORKER = HERE / "fixtures" / "distributed_worker.py"
sys.path.insert(0, str(HERE / "fixtures"))

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def _torchrun(args, tmp_path, cache: Path, timeout=300):
    env = dict(os.environ, EXCISE_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    _torchrun([str(WORKER), str(tmp)], tmp, tmp / "cache")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def one_rank():
    from distributed_worker import compute

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compute()
    finally:
        torch.set_num_threads(threads)


def _close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def test_the_workers_formed_a_group(two_ranks):
    assert [r["rank"] for r in two_ranks] == [0, 1] and {r["world"] for r in two_ranks} == {2}


@pytest.mark.parametrize("name", ["fisher_batch", "moments_mean", "moments_second", "sensitivity"])
def test_sharded_importance_equals_one_process(two_ranks, one_rank, name):
    for r in two_ranks:  # the same batches, summed in another order: float summation only
        _close(r[name], one_rank[name], rtol=1e-5, atol=1e-9)
    _close(two_ranks[0][name], two_ranks[1][name], rtol=0, atol=0)  # one all-reduce: the same bits everywhere


def test_ssd_is_the_one_process_result(two_ranks, one_rank):
    for r in two_ranks:
        for k, m in one_rank["ssd_mask"].items():
            assert torch.equal(r["ssd_mask"][k], m), k
        _close(r["ssd_state"], one_rank["ssd_state"], rtol=1e-5, atol=1e-7)
        assert r["ssd_again_cache"] == "hit"  # rank 0 read the cache, the other rank received its scores
        _close(r["ssd_again_state"], r["ssd_state"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["scissorhands_state", "finetune_state", "train_state"])
def test_data_parallel_training_matches_one_process(two_ranks, one_rank, name):
    before = __import__("distributed_worker").tiny_model().state_dict()
    moved = max(float((one_rank[name][k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-2  # the steps did something, so agreeing means something
    for r in two_ranks:
        _close(r[name], one_rank[name], rtol=1e-4, atol=1e-5)
    _close(two_ranks[0][name], two_ranks[1][name], rtol=0, atol=0)  # rank 0's weights returned everywhere


def test_scissorhands_projected_on_the_reduced_gradient(two_ranks, one_rank):
    assert two_ranks[0]["scissorhands_projections"] == two_ranks[1]["scissorhands_projections"] == \
        one_rank["scissorhands_projections"]


def test_ranks_stayed_in_step(two_ranks):
    for r in two_ranks:
        for method, info in r["info"].items():
            assert info["world_size"] == 2
            assert info["end_spread"] < 1e-5, method  # before rank 0's weights were broadcast


def test_a_non_finite_loss_on_one_rank_raises_on_every_rank(two_ranks, one_rank):
    assert one_rank["non_finite"] is not None and "not finite" in one_rank["non_finite"]
    for r in two_ranks:
        assert r["non_finite"] == one_rank["non_finite"]


def test_a_loader_that_differs_between_ranks_is_refused(two_ranks):
    for r in two_ranks:
        assert r["mismatch"] is not None and "different batches on different ranks" in r["mismatch"]


def test_outside_a_group_everything_is_the_identity():
    assert not dist_mod.active() and dist_mod.rank() == 0 and dist_mod.world() == 1 and dist_mod.is_main()
    batch = (torch.arange(5), torch.ones(5))
    assert dist_mod.part(batch) == (batch, 1.0)
    assert [b for b in dist_mod.shard([1, 2, 3])] == [1, 2, 3]
    assert [t for t in dist_mod.split([1, 2])] == [(1, 1.0), (2, 1.0)]
    assert dist_mod.total(3) == 3 and dist_mod.all_true(True) and not dist_mod.all_true(False)


def test_unlearn_command_under_torchrun_writes_one_folder(tmp_path):
    from excise.cli import main
    from excise.models import build_model
    from excise.training import read_state, save_state

    model = build_model("mlp", (1, 8, 8), 10)
    save_state(model, tmp_path / "user.safetensors")
    args = ["--model", str(tmp_path / "user.safetensors"), "--arch", "mlp", "--data", "digits", "--forget",
            "class:3", "--method", "ssd", "--hp", "alpha=2", "--quiet"]
    done = _torchrun(["-m", "excise", "unlearn", *args, "--out", str(tmp_path / "two")], tmp_path,
                     tmp_path / "cache")
    assert done.stdout.count("wrote ") == 1  # rank 0 alone prints
    assert main(["unlearn", *args, "--out", str(tmp_path / "one")]) == 0
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["cache", "one", "two", "user.safetensors"]  # no staging folder or second copy left behind
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    a, b = read_state(tmp_path / "two" / "model.safetensors"), read_state(tmp_path / "one" / "model.safetensors")
    _close(a, b, rtol=1e-5, atol=1e-7)
    meta = json.loads((tmp_path / "two" / "results.json").read_text())["meta"]["result"]
    assert meta["info"]["distributed"]["world_size"] == 2


def test_bench_under_torchrun_matches_one_process(tmp_path):
    from excise.cli import main

    proto = tmp_path / "tiny.toml"
    proto.write_text('name = "digits-mlp-class"\ndataset = "digits"\narch = "mlp"\nforget = "class:3"\n'
                     'val_fraction = 0.1\nseeds = [0]\nimportance_batch = 64\n[recipe]\nepochs = 4\n'
                     'batch_size = 64\n[methods.ssd]\nalpha = 5.0\n[methods.finetune]\n')
    _torchrun(["-m", "excise", "bench", str(proto), "--quiet", "--out", str(tmp_path / "two")], tmp_path,
              tmp_path / "cache")
    assert main(["bench", str(proto), "--quiet", "--out", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    two = {r["method"]: r for r in json.loads((tmp_path / "two" / "report.json").read_text())["rows"]}
    one = {r["method"]: r for r in json.loads((tmp_path / "one" / "report.json").read_text())["rows"]}
    assert two.keys() == one.keys() and {"original", "ssd", "finetune"} <= set(one)
    for method, row in one.items():  # the original and oracle trained data-parallel, the methods run on them
        for metric in ("UA", "RA", "TA"):
            assert abs(two[method][metric] - row[metric]) <= 1.0, (method, metric)
