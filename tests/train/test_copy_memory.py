"""Tiny copy-memory runs on CPU: learning, modes, checkpoint/resume, metrics log."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from deq_ext import SolverStats
from train.config import parse_config
from train.copy_memory import PRESETS, CopyConfig, main
from train.loop import forward_f_rows, lr_factor

TINY = ["--preset", "tiny"]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("model,mode", [("transformer", "deq"), ("transformer", "unrolled"),
                                        ("trellisnet", "deq"), ("trellisnet", "unrolled")])
def test_tiny_run_lowers_the_loss(model: str, mode: str) -> None:
    out = main(TINY + ["--model", model, "--mode", mode])
    losses = out["losses"]
    assert len(losses) == 24
    assert _mean(losses[-4:]) < 0.85 * _mean(losses[:4])
    assert out["final"]["test_loss"] < 0.85 * losses[0]
    assert out["final"]["test_sequences"] == 64.0  # the last evaluation reads the whole test set
    saved = out["final"].get("test_f_rows_saved_by_compaction")
    assert (saved is None) == (mode != "deq")


def test_metrics_log_and_solver_iterations(tmp_path) -> None:
    out_dir = tmp_path / "run"
    results = tmp_path / "r.json"
    main(TINY + ["--out-dir", str(out_dir), "--results", str(results)])
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["event"] == "train"]
    evals = [r for r in lines if r["event"] == "eval"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 24]
    assert train[0]["mode"] == "pretrain" and "fwd_iter" not in train[0]
    deq = train[-1]
    assert deq["mode"] == "deq" and deq["fwd_iter"] >= 1 and deq["bwd_iter"] >= 1
    for key in ("loss", "ppl", "time", "peak_mem_mb", "lr"):
        assert key in deq
    # The logged rate is the one the logged step used (step 5 ran with schedule step 4).
    cfg = parse_config(CopyConfig, TINY, "x", PRESETS)
    assert train[0]["lr"] == pytest.approx(cfg.lr * lr_factor(4, cfg))
    assert evals[-1]["step"] == 24 and "test_loss" in evals[-1]
    record = json.loads(results.read_text())
    assert record["final_test"]["test_loss"] == evals[-1]["test_loss"]
    assert (out_dir / "last.pt").exists()


def test_forward_f_rows_counts_each_sample_and_the_whole_batch() -> None:
    def stats(nfev: list[int]) -> dict:
        n = torch.tensor(nfev)
        return {"forward": SolverStats(n - 1, n, n.double(), n.double(), n), "backward": None}

    model = SimpleNamespace(core=SimpleNamespace(solver_stats=[stats([3, 5, 2]), stats([4])]))
    assert forward_f_rows(model) == (3 + 5 + 2 + 4, 3 * 5 + 1 * 4)
    assert forward_f_rows(SimpleNamespace(core=SimpleNamespace(solver_stats=[]))) == (0, 0)


def test_reported_rows_saved_are_the_rows_f_was_evaluated_on() -> None:
    """The figure comes from the solver's step counts; here the cell itself counts its rows."""
    from train.copy_memory import PRESETS, CopyTask
    from train.loop import seed_everything, train

    cfg = parse_config(CopyConfig, TINY + ["--progress", "false", "--device", "cpu"], "x", PRESETS)
    seed_everything(cfg.seed)
    task = CopyTask(cfg, torch.device("cpu"))
    train(cfg, task, 0, 1, torch.device("cpu"))  # trained: its samples converge unevenly
    solves: list[list[int]] = []  # per core forward: [batch, calls of f, rows f saw]
    core = task.model.core
    core.register_forward_pre_hook(lambda m, args: solves.append([args[0].shape[0], 0, 0]))

    def count(module, args) -> None:
        solves[-1][1] += 1
        solves[-1][2] += args[0].shape[0]

    core.cell.register_forward_pre_hook(count)
    with torch.no_grad():
        saved = task.evaluate("test", final=True)["f_rows_saved_by_compaction"]
    rows, whole = sum(r for _, _, r in solves), sum(b * c for b, c, _ in solves)
    assert rows < whole
    assert saved == pytest.approx(1 - rows / whole)


def test_resume_gives_the_same_losses(tmp_path) -> None:
    """With dropout on, so that the resumed run must also continue the random stream."""
    args = TINY + ["--steps", "12", "--pretrain-steps", "4", "--dropout", "0.2"]
    full = main(args)["losses"]
    assert full != main(args + ["--seed", "1"])["losses"]  # the masks do change the losses
    out_dir = str(tmp_path / "ckpt")
    part = main(args + ["--out-dir", out_dir], stop_at=8)   # interrupted after step 8
    assert part["losses"] == full[:8]
    resumed = main(args + ["--out-dir", out_dir, "--resume", "auto"])
    assert resumed["start"] == 8
    assert resumed["losses"] == full[8:]                 # bit for bit


def test_without_a_progress_bar_it_prints_log_lines_and_the_final_summary(capsys) -> None:
    main(TINY + ["--progress", "false", "--log-every", "6"])
    out = capsys.readouterr().out
    assert out.startswith("copy memory: T=")
    assert "step 6/24 loss" in out and "step 24/24 loss" in out and "\r" not in out
    assert "final test loss" in out.splitlines()[-1]


def test_tensorboard_gets_the_logged_scalars(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(TINY + ["--progress", "false", "--log-every", "4", "--tensorboard", str(tmp_path)])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(4, 25, 4))
    assert [e.step for e in events.Scalars("eval/test_loss")] == [24]


def test_missing_checkpoint_is_an_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        main(TINY + ["--resume", str(tmp_path / "none.pt")])


def test_each_rank_builds_the_same_model_but_draws_its_own_dropout_stream(monkeypatch) -> None:
    import train.copy_memory as script

    class Stop(Exception):
        pass

    seen = {}

    def fake_train(cfg, task, rank, world, device, stop_at=None):
        seen[rank] = (torch.rand(4), next(task.model.parameters()).detach().clone())
        raise Stop

    monkeypatch.setattr(script, "train", fake_train)
    for rank in (0, 1):
        monkeypatch.setattr(script, "init_distributed",
                            lambda device, r=rank: (r, 2, torch.device("cpu")))
        with pytest.raises(Stop):
            script.main(TINY + ["--progress", "false"])
    assert torch.equal(seen[0][1], seen[1][1])      # identical initial parameters
    assert not torch.equal(seen[0][0], seen[1][0])  # different random streams (dropout masks)


def test_graph_flag_reaches_every_solve_and_needs_cuda() -> None:
    from train.copy_memory import CopyModel

    cfg = parse_config(CopyConfig, TINY + ["--graph", "true"], "", PRESETS)
    modes = CopyModel(cfg).core.modes
    for settings in (modes.forward, modes.backward, modes.eval_forward):
        assert settings.options.get("graph") is True
    assert "graph" not in CopyModel(parse_config(CopyConfig, TINY, "", PRESETS)).core.modes.forward.options
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            main(TINY + ["--graph", "true", "--device", "cpu"])
