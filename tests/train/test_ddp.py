"""A 2-process gloo DistributedDataParallel run (as torchrun would start it), on loopback."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from .test_language_model import write_corpus


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _task(script: str, data_dir: str, rank: int, world: int):
    """``(cfg, task, device)`` of a tiny run of ``script`` in a process of the group."""
    from train.config import parse_config
    from train.loop import init_distributed, seed_everything

    if script == "copy":
        from train.copy_memory import PRESETS, CopyConfig, CopyTask

        cfg = parse_config(CopyConfig, ["--preset", "tiny", "--steps", "6", "--pretrain-steps",
                                        "2", "--device", "cpu"], "x", PRESETS)
    else:
        from train.data_lm import Corpus
        from train.language_model import LMRunConfig, LMTask

        cfg = parse_config(LMRunConfig, ["--data", data_dir, "--model-preset",
                                         "deq_trellisnet_tiny", "--tgt-len", "8", "--batch-size",
                                         "2", "--steps", "6", "--pretrain-steps", "2",
                                         "--eval-batch-size", "2", "--progress", "false",
                                         "--dropout", "0.2", "--device", "cpu"], "x")
    rank_, world_, device = init_distributed(cfg.device)
    assert (rank_, world_) == (rank, world)
    # Different seeds per rank: DDP must broadcast rank 0's initial parameters.
    seed_everything(cfg.seed + rank)
    if script == "copy":
        return cfg, CopyTask(cfg, device), device
    return cfg, LMTask(cfg, Corpus(data_dir), device, rank, world), device


def _resume_worker(rank: int, world: int, port: int, out_dir: str, data_dir: str) -> None:
    """An uninterrupted LM run, then the same run interrupted after 3 steps and resumed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from train.loop import seed_everything, train

    runs = {}
    ckpt_dir = os.path.join(out_dir, "ckpt")
    for name, changes, stop_at in (("full", {}, None), ("part", {"out_dir": ckpt_dir}, 3),
                                   ("resumed", {"out_dir": ckpt_dir, "resume": "auto"}, None)):
        cfg, task, device = _task("lm", data_dir, rank, world)
        seed_everything(cfg.seed + rank)
        runs[name] = train(dataclasses.replace(cfg, **changes), task, rank, world, device,
                           stop_at=stop_at)["losses"]
        dist.barrier()  # the checkpoint is written by rank 0 before anyone resumes
    torch.save(runs, os.path.join(out_dir, f"resume{rank}.pt"))
    dist.destroy_process_group()


def _spawn(fn, args: tuple) -> None:
    ctx = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method="spawn")
    # Bounded: a hung collective fails the test instead of the suite.
    for _ in range(120):
        if ctx.join(timeout=1):
            return
    for p in ctx.processes:
        p.kill()
    raise AssertionError("the 2-process run did not finish in 120 s")


def _worker(rank: int, world: int, port: int, out_dir: str, script: str, data_dir: str) -> None:
    # The environment torchrun sets for each process.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from train.loop import train

    cfg, task, device = _task(script, data_dir, rank, world)
    assert dist.get_backend() == "gloo"
    summary = train(cfg, task, rank, world, device)
    state = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    first_batch = (task.batch_indices(0, rank, world) if script == "copy"
                   else task.train_data[:, :8].flatten())
    torch.save({"state": state, "losses": summary["losses"], "batch": first_batch},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("script", ["copy", "lm"])
def test_two_process_gloo_run_keeps_parameters_identical(tmp_path, script: str) -> None:
    data_dir = write_corpus(tmp_path / "corpus", lines=(100, 10, 10))
    _spawn(_worker, (2, _free_port(), str(tmp_path), script, data_dir))
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    # Each rank trained on its own half of the global batch, so the local losses differ.
    if script == "copy":
        assert set(r0["batch"].tolist()).isdisjoint(r1["batch"].tolist())
    else:
        assert not torch.equal(r0["batch"], r1["batch"])
    assert r0["losses"] != r1["losses"]


def test_two_process_resume_restores_each_ranks_own_memory(tmp_path) -> None:
    """Every rank resumes with its own language-model memory and RNG (its dropout stream): the
    resumed losses are those of the uninterrupted run on both ranks, bit for bit."""
    data_dir = write_corpus(tmp_path / "corpus", lines=(100, 10, 10))
    _spawn(_resume_worker, (2, _free_port(), str(tmp_path), data_dir))
    for rank in (0, 1):
        runs = torch.load(tmp_path / f"resume{rank}.pt")
        assert runs["part"] == runs["full"][:3], rank
        assert runs["resumed"] == runs["full"][3:], rank  # bit for bit, dropout on
