"""Mutation check: small breaks of the Python layer that the test suite must catch.

``python tools/mutation_check.py [--list] [--only ID ...]``

Each mutant replaces a snippet of one file (found exactly once, or the list is stale and
the check fails), runs the tests named for it, and restores the file. A mutant whose tests
still pass "survived": the claim it breaks is not guarded. The check fails when any mutant
survives or cannot be applied. The list grows with every claim the documentation makes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    id: str
    claim: str                      # what the documentation promises, that this break violates
    file: str                       # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (original snippet, replacement), each found once
    tests: tuple[str, ...]          # pytest arguments: the tests that must fail


def _m(id: str, claim: str, file: str, old: str, new: str, *tests: str) -> Mutant:
    return Mutant(id, claim, file, ((old, new),), tests)


MUTANTS: tuple[Mutant, ...] = (
    _m("line-search-batch-wide",
       "the line search backtracks per sample; nothing depends on the batch",
       "deq_ext/solvers/broyden.py",
       "need = active & ~(phi <= phi0 * (1 - c1 * alpha)) & (alpha > alpha_min)",
       "need = active & (~(phi <= phi0 * (1 - c1 * alpha)) & (alpha > alpha_min)).any()",
       "tests/test_broyden_solver.py::test_line_search_is_per_sample_and_batch_invariant", "-k", "cpu"),
    _m("resume-without-rng",
       "a resumed run produces the same losses as an uninterrupted one",
       "train/loop.py",
       '        set_rng_state(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)])\n',
       "",
       "tests/train/test_copy_memory.py::test_resume_gives_the_same_losses"),
    _m("resume-without-optimizer",
       "checkpoints hold the optimizer state",
       "train/loop.py",
       '        opt.load_state_dict(ckpt["optimizer"])\n', "",
       "tests/train/test_copy_memory.py::test_resume_gives_the_same_losses"),
    Mutant("closure-keeps-forward-state",
           "the memory kept for backward does not grow with the iterations",
           "deq_ext/layer.py",
           (("    res = solve(f, z0.detach(), method=fwd.method, inputs=inputs,",
             "    res = solve(f, z0.detach(), method=fwd.method, inputs=inputs, return_state=True,"),
            ("        adjoint = AdjointMap(f, f_inputs, fz, z_leaf, grad, rerecord_below, autocast)",
             "        _ = res\n"
             "        adjoint = AdjointMap(f, f_inputs, fz, z_leaf, grad, rerecord_below, autocast)")),
           ("tests/test_layer.py::test_bytes_kept_alive_until_backward_do_not_grow_with_iterations",)),
    _m("phantom-one-step",
       "phantom gradients backpropagate through phantom_steps damped steps",
       "deq_ext/layer.py",
       "    for i in range(steps):", "    for i in range(1):",
       "tests/test_layer.py::test_phantom_gradient_is_the_gradient_of_damped_steps_from_the_fixed_point"),
    _m("extension-not-loaded",
       "the compiled ops match the reference (and are what the tests run)",
       "deq_ext/_extension.py",
       "    from . import _C  # type: ignore[attr-defined, no-redef]",
       '    raise ImportError("deq_ext._C disabled by a mutant")',
       "tests/test_methods.py::test_extension_matches_reference_step_by_step", "-k", "cpu"),
    _m("unfinished-counted-converged",
       "a sample that runs out of iterations is flagged max_iter",
       "deq_ext/solvers/_base.py",
       "        return torch.where(status == Status.ACTIVE, int(Status.MAX_ITER), status)",
       "        return torch.where(status == Status.ACTIVE, int(Status.CONVERGED), status)",
       "tests/test_broyden_solver.py::test_stalled_sample_is_flagged"),
    _m("batch-wide-pending-ignored",
       "per_sample=False: every sample iterates until all have converged",
       "deq_ext/solvers/_base.py",
       "self.stall_patience, self.diverge_ratio, count_step, self.per_sample)",
       "self.stall_patience, self.diverge_ratio, count_step, True)",
       "tests/test_broyden_solver.py::test_batch_wide_stopping_mode", "-k", "cpu"),
    _m("stop-one-sample-early",
       "every sample stops on its own convergence",
       "deq_ext/solvers/_base.py",
       "                    if n_pending == 0:\n                        break",
       "                    if n_pending <= 1:\n                        break",
       "tests/test_broyden_solver.py::test_heterogeneous_batch_stops_each_sample_on_its_own",
       "-k", "cpu"),
    _m("compaction-inputs-not-gathered",
       "compaction gives f the rows of the active samples of every batched input",
       "deq_ext/solvers/_buckets.py",
       "        lambda t: t.index_select(0, rows) if t.dim() >= 1 and t.shape[0] == batch else t, x)",
       "        lambda t: t, x)",
       "tests/test_compaction.py::test_compaction_gives_identical_results", "-k", "cpu"),
    _m("compaction-wrong-rows",
       "compaction evaluates f on the active samples",
       "deq_ext/solvers/_buckets.py",
       "    return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]",
       "    return torch.argsort(mask.to(torch.uint8), stable=True)[:count]",
       "tests/test_compaction.py::test_compaction_gives_identical_results", "-k", "cpu"),
    _m("adjoint-starts-at-zero",
       "the adjoint solve starts from dL/dz* (a tiny gradient is not zeroed)",
       "deq_ext/layer.py",
       "    y0 = torch.where(finite.view(shape), grad, torch.zeros_like(grad))",
       "    y0 = torch.zeros_like(grad)",
       "tests/test_layer.py::test_tiny_upstream_gradient_is_not_zeroed"),
    _m("compact-argument-wins",
       "a compact among the forward settings' options overrides the argument",
       "deq_ext/layer.py",
       '    kwargs = {"compact": compact, **fwd.resolved("forward").solver_kwargs()}',
       '    kwargs = {**fwd.resolved("forward").solver_kwargs(), "compact": compact}',
       "tests/test_layer.py::test_compact_in_the_settings_options_overrides_the_argument"),
    _m("batch-wide-not-frozen-on-device",
       "results do not depend on check_every or on syncing (batch-wide stopping)",
       "deq_ext/solvers/_base.py",
       "            self.status.copy_(torch.where(done, self.final_status(), self.status))",
       "            pass",
       "tests/test_sync_free.py::test_results_do_not_depend_on_check_every_or_on_syncing",
       "-k", "cpu and batch_wide"),
    _m("check-every-ignored",
       "check_every reads the pending count once every k iterations",
       "deq_ext/solvers/_base.py",
       "            if reader is not None and (runner is not None or it % self.check_every == 0):\n"
       "                counts = reader.read()",
       "            if reader is not None:\n"
       "                counts = reader.read()",
       "tests/test_sync_free.py::test_check_every_reads_the_count_once_every_k_iterations",
       "-k", "cpu"),
    _m("line-search-reads-without-stop-early",
       "stop_early=False reads nothing from the device, line search included",
       "deq_ext/solvers/broyden.py",
       "        reads = self.stop_early and not self.graph",
       "        reads = True",
       "tests/test_sync_free.py::test_stop_early_false_reads_nothing_from_the_device",
       "-k", "cpu and broyden-ls"),
    _m("z0-check-skipped",
       "a non-finite z0 is rejected with a clear error",
       "deq_ext/solvers/_base.py",
       '        if opts.stop_early and not bool(torch.isfinite(z0).all()):',
       "        if False:",
       "tests/test_sync_free.py::test_non_finite_start_flags_its_sample_without_a_read",
       "-k", "cpu"),
    _m("backward-warning-lost",
       "a sync-free backward warns about diverged samples when its stats are read",
       "deq_ext/layer.py",
       "            bstats.check_backward_divergence = sync_free",
       "            bstats.check_backward_divergence = False",
       "tests/test_sync_free.py::test_sync_free_backward_defers_its_divergence_warning_to_the_stats",
       "-k", "cpu"),
    _m("warm-start-ignores-h",
       "backward init='shine' starts the adjoint solve from the forward estimate -H^T dL/dz*",
       "deq_ext/layer.py",
       "            y0 = _adjoint_start(grad, estimate if init == \"shine\" else None)",
       "            y0 = _adjoint_start(grad, None)",
       "tests/test_shine.py::test_warm_start_from_an_exact_estimate_needs_no_adjoint_step"),
    Mutant("warm-start-applies-h",
           "the SHINE estimate (warm start and grad_mode='shine') applies H^T, not H",
           "deq_ext/shine.py",
           (('            coef = torch.einsum("bkd,bd->bk", U, g)',
             '            coef = torch.einsum("bkd,bd->bk", V, g)'),
            ('            y -= torch.einsum("bkd,bk->bd", V, coef)',
             '            y -= torch.einsum("bkd,bk->bd", U, coef)')),
           ("tests/test_shine.py::test_estimate_is_minus_h_transpose_applied_per_sample",
            "tests/test_shine.py::test_shine_gradient_of_a_linear_f_is_minus_h_transpose_of_dl_dz")),
    _m("shine-never-falls-back",
       "grad_mode='shine' solves the adjoint exactly for the samples whose estimate fails a check",
       "deq_ext/layer.py",
       "    samples = torch.nonzero(code != ShineFallback.NONE).flatten()",
       "    samples = torch.nonzero(code < 0).flatten()",
       "tests/test_shine.py::test_each_sample_falls_back_to_the_exact_adjoint_for_its_own_reason"),
    _m("shine-check-ignored",
       "a SHINE estimate whose adjoint residual is above shine_tol falls back",
       "deq_ext/shine.py",
       "    bad = (code == ShineFallback.NONE) & ~(rel <= shine_tol)",
       "    bad = (code == ShineFallback.NONE) & (rel < 0)",
       "tests/test_shine.py::test_fallback_samples_get_the_implicit_gradient_of_the_whole_batch_solve"),
    _m("pairs-kept-by-default",
       "only the SHINE modes keep the forward's pairs until backward",
       "deq_ext/layer.py",
       "    keep_pairs = torch.is_grad_enabled() and _check_backward_modes(grad_mode, fwd, bwd)",
       "    keep_pairs = torch.is_grad_enabled() and fwd.method == \"broyden\"",
       "tests/test_layer.py::test_bytes_kept_alive_until_backward_do_not_grow_with_iterations"),
    _m("compiled-f-donates-buffers",
       "a torch.compile'd f works in a DEQ (repeated VJPs in the adjoint solve)",
       "deq_ext/adjoint.py",
       "        return config.patch(donated_buffer=False)",
       "        return contextlib.nullcontext()",
       "tests/test_compile.py::test_compiled_training_step_of_the_tiny_deq_transformer_matches_eager",
       "-k", "aot_eager and float64"),
    # -- Jacobian regularization, recorded states, structured states, registry --------------
    _m("jac-reg-not-averaged",
       "jac_reg estimates ||J||_F^2 / D, averaged over its probes",
       "deq_ext/jacobian.py",
       "return total / (samples * max(D, 1))", "return total / max(D, 1)",
       "tests/test_jac_reg.py::test_samples_average_the_single_probe_estimates"),
    _m("jac-reg-in-eval",
       "the layer computes its Jacobian term in training only",
       "deq_ext/layer.py",
       "jac_reg_samples=self.jac_reg_samples if self.training else 0,",
       "jac_reg_samples=self.jac_reg_samples,",
       "tests/test_jac_reg.py::test_layer_jac_loss_reuses_the_recorded_application_of_f"),
    _m("record-last-not-lowest",
       "record=[k] keeps what the solve stopped at step k returns (its lowest-residual iterate)",
       "deq_ext/solvers/_base.py",
       "self.snapshots[slot].copy_(self.z if self.return_final else self.z_best)",
       "self.snapshots[slot].copy_(self.z)",
       "tests/test_record.py::test_recorded_iterate_is_the_lowest_residual_one_unless_return_final"),
    _m("n-states-without-phantom",
       "every state of n_states carries a phantom gradient",
       "deq_ext/layer.py",
       "states = [_phantom(f, z.detach(), inputs, phantom_steps, phantom_damping) for z in earlier]",
       "states = [z.detach() for z in earlier]",
       "tests/test_record.py::test_n_states_are_phantom_steps_from_the_solves_stopped_there"),
    _m("structured-state-order",
       "tuple and dict states are flattened and restored consistently",
       "deq_ext/states.py",
       "torch.cat([t.reshape(n, -1) for t in leaves], dim=1)",
       "torch.cat([t.reshape(n, -1) for t in reversed(leaves)], dim=1)",
       "tests/test_tuple_states.py::test_gradients_match_the_flattened_reference"),
    _m("registry-unchecked-result",
       "a registered solver that returns something else is reported",
       "deq_ext/solvers/registry.py",
       "if not isinstance(res, SolverResult):", "if False:",
       "tests/test_registry.py::test_a_solver_returning_the_wrong_thing_is_reported"),
    _m("torchdeq-indexing-final-only",
       "the torchdeq adapter answers indexing with the solve stopped at each step",
       "deq_ext/compat.py",
       "trajectory = [recorded.get(int(k), res.z) for k in (indexing or [])]",
       "trajectory = [res.z for k in (indexing or [])]",
       "tests/test_compat.py::test_torchdeq_indexing_returns_the_solve_stopped_at_each_step"),
    # -- compacted adjoint solve ----------------------------------------------------------------
    _m("adjoint-never-narrows",
       "the adjoint solve re-records f on the active rows; gradients unchanged",
       "deq_ext/solvers/_base.py",
       "        self.narrow(rows)\n        return self.bucket(rows)", "        return self.bucket(rows)",
       "tests/test_adjoint_compaction.py::test_gradients_equal_the_uncompacted_solve_with_fewer_vjp_rows"),
    _m("adjoint-inputs-not-gathered",
       "the re-recorded f sees the active rows' own inputs",
       "deq_ext/adjoint.py",
       "fz = self.f(z_leaf, *[take_rows(x, rows, self.B) for x in self.inputs])",
       "fz = self.f(z_leaf, *list(self.inputs))",
       "tests/test_adjoint_compaction.py::test_gradients_equal_the_uncompacted_solve_with_fewer_vjp_rows"),
    _m("adjoint-vjp-rows-miscounted",
       "backward_stats.vjp_rows counts the rows of the graphs the VJPs went through",
       "deq_ext/adjoint.py",
       "self.vjp_rows += self.size", "self.vjp_rows += self.B",
       "tests/test_adjoint_compaction.py::test_gradients_equal_the_uncompacted_solve_with_fewer_vjp_rows"),
    _m("adjoint-compacts-despite-forward",
       "an f that mixes samples (forward compact=False) keeps the whole-batch adjoint",
       "deq_ext/layer.py",
       'options.setdefault("compact", kwargs["compact"])',
       'options.setdefault("compact", True)',
       "tests/test_adjoint_compaction.py::test_rerecord_threshold_and_switches"),
    # -- locuslab adapters in official semantics -----------------------------------------------
    _m("compat-default-semantics",
       "the locuslab adapters reproduce the official solvers by default",
       "deq_ext/compat.py",
       'DEFAULT_SEMANTICS = "official"', 'DEFAULT_SEMANTICS = "deq_ext"',
       "tests/test_compat.py::test_semantics_switch_function_environment_and_argument"),
    _m("official-anderson-denominator",
       "official anderson: relative residual over ||f(z)|| + 1e-5",
       "deq_ext/_locuslab_official.py",
       "_ANDERSON_REL_EPS = 1e-5", "_ANDERSON_REL_EPS = 1e-9",
       "tests/test_compat_official.py", "-k", "anderson"),
    _m("official-broyden-break",
       "official broyden: protective break at its threshold times seq_len",
       "deq_ext/_locuslab_official.py",
       'protect = (1e6 if stop_mode == "abs" else 1e3) * seq_len',
       'protect = (1e6 if stop_mode == "abs" else 1e3)',
       "tests/test_compat_official.py", "-k", "broyden"),
    # -- models and recipes ----------------------------------------------------------------------
    _m("trellisnet-output-channels",
       "the TrellisNet's output is the last d_output channels of h",
       "models/trellisnet.py",
       "return z[:, self.cfg.d_hidden: self.cfg.h_size].transpose(1, 2)",
       "return z[:, : self.cfg.output_width].transpose(1, 2)",
       "tests/models/test_paper_fidelity.py::"
       "test_trellisnet_h_is_nhid_plus_nout_and_the_output_is_its_last_nout_channels"),
    _m("attention-without-residual",
       "the attention sublayer computes LN(attn + z) by default",
       "models/transformer.py",
       "if self.attn_residual:", "if False:",
       "tests/models/test_paper_fidelity.py", "-k", "adds_z_before"),
    _m("copy-delimiter-position",
       "copy memory: the delimiter 9 at 1-based position T + 10",
       "train/data_copy.py",
       "x[:, T + N_SYMBOLS - 1] = DELIMITER", "x[:, T + N_SYMBOLS] = DELIMITER",
       "tests/train/test_data_copy.py::test_inputs_follow_the_definition"),
    _m("subsequence-sees-all",
       "a later chunk sees only the previous chunk by default",
       "models/modes.py",
       'if self.modes.subseq_history == "all":', "if True:",
       "tests/models/test_equilibrium.py::test_a_later_chunk_sees_only_the_previous_chunk_by_default"),
    _m("lm-amp-default",
       "language models train in float32 by default",
       "train/language_model.py",
       'amp: str = "off"', 'amp: str = "auto"',
       "tests/train/test_recipes.py::test_language_models_train_in_float32_by_default"),
    _m("mdeq-batch-norm",
       "the image DEQ solves each sample on its own (no batch statistics)",
       "models/mdeq.py",
       "self.post = nn.ModuleList(nn.GroupNorm(cfg.groups, c) for c in cfg.channels)",
       "self.post = nn.ModuleList(nn.BatchNorm2d(c) for c in cfg.channels)",
       "tests/train/test_digits.py::test_each_sample_is_solved_on_its_own"),
    _m("digits-jac-weight-ignored",
       "train.digits weights its Jacobian term by --jac-reg-weight",
       "train/digits.py",
       "loss = loss + self.cfg.jac_reg_weight * jac", "loss = loss + jac",
       "tests/train/test_digits.py::test_jacobian_regularization_is_added_to_the_loss"),
    # -- benchmarks --------------------------------------------------------------------------
    _m("bench-verdict-when-busy",
       "a benchmark run on a busy machine reports figures but no verdict",
       "benchmarks/solver_bench.py",
       "passed = None if v is None or busy else (", "passed = None if v is None else (",
       "tests/benchmarks/test_solver_bench.py::test_busy_machine_gets_figures_but_no_verdict"),
    _m("bench-any-type-error-skips-a-row",
       "only an optional row (graph=True) is skipped when the solver rejects its option",
       "deq_ext/bench/solves.py",
       "            if name not in OPTIONAL:\n                raise\n",
       "            if False:\n                raise\n",
       "tests/test_bench.py::test_an_optional_row_the_solver_rejects_is_skipped_with_a_note"),
    _m("bench-f-timer-waits",
       "on CUDA the bench times f with events, never waiting inside the timed solve",
       "deq_ext/bench/problem.py",
       "            end.record()\n", "            end.record()\n            torch.cuda.synchronize()\n",
       "tests/test_bench.py::test_cuda_f_timer_records_events_and_never_waits_inside_the_solve"),
    _m("bench-floor-ignores-ring-fill",
       "the bandwidth floor counts each sample's steps at its ring's fill",
       "deq_ext/bench/limits.py",
       "full = max(n - memory, 0)", "full = n",
       "tests/test_bench.py::test_passes_bytes_counts_each_sample_at_its_ring_fill"),
    _m("peak-counts-aliases",
       "the CPU peak memory counts each new storage once (views and in-place ops allocate nothing)",
       "benchmarks/peak_memory.py",
       "if key in inputs or key in self._live:", "if key in self._live:",
       "tests/benchmarks/test_tables.py::test_peak_tracker_counts_new_storages_once_and_frees_them"),
    _m("history-dtype-ignored",
       "history_dtype stores Broyden's U and V in half precision",
       "deq_ext/solvers/broyden.py",
       'History(("U", "V"), self.B, self.D, memory, history_dtype, self.device)',
       'History(("U", "V"), self.B, self.D, memory, self.state_dtype, self.device)',
       "tests/test_history_dtype.py::test_solver_converges_with_a_narrow_history",
       "tests/test_history_dtype.py::test_workspace_halves_the_history_bytes", "-k", "cpu or halves"),
    _m("history-dtype-unvalidated",
       "a history dtype other than bfloat16/float16 is a clear error",
       "deq_ext/solvers/_base.py",
       "if history_dtype is not None and history_dtype not in NARROW_HISTORY + (state_dtype,):",
       "if False:",
       "tests/test_history_dtype.py::test_history_dtype_is_validated"),
    _m("train-logs-abs-residual",
       "metrics.jsonl logs the mean relative residual of each DEQ solve (Figure 2 right)",
       "train/loop.py",
       "s[key].rel_residual.double().mean()", "s[key].abs_residual.double().mean()",
       "tests/train/test_layer_change.py::"
       "test_solver_residuals_average_the_relative_residuals_of_each_solve"),
    _m("figure4-no-depth",
       "Figure 4 follows the unrolled model layer by layer",
       "benchmarks/figure_data.py",
       "        z = nxt\n", "",
       "tests/benchmarks/test_figures.py::test_figure4_relative_change_shrinks_with_depth"),
    _m("training-step-ratio-inverted",
       "the training-step ratio is torchdeq's time over deq_ext's",
       "benchmarks/training_step.py",
       'r = ratio(median_s["torchdeq"], median_s["deq_ext"])',
       'r = ratio(median_s["deq_ext"], median_s["torchdeq"])',
       "tests/benchmarks/test_training_step.py::"
       "test_quick_run_records_provenance_and_every_workload"),
    _m("history-default-wide",
       "Broyden's history is bfloat16 by default under a float32 state",
       "deq_ext/solvers/broyden.py",
       "return torch.bfloat16 if state_dtype == torch.float32 else state_dtype",
       "return state_dtype",
       "tests/test_history_dtype.py::"
       "test_broyden_history_defaults_to_bfloat16_under_a_float32_state"),
    _m("history-default-narrow-float64",
       "a float64 Broyden solve keeps a wide history by default",
       "deq_ext/solvers/broyden.py",
       "return torch.bfloat16 if state_dtype == torch.float32 else state_dtype",
       "return torch.bfloat16",
       "tests/test_history_dtype.py::"
       "test_broyden_history_defaults_to_bfloat16_under_a_float32_state"),
    _m("restart-ignored",
       "restart=True starts a full ring over (restarted Broyden)",
       "deq_ext/solvers/broyden.py",
       "        self.restart = restart", "        self.restart = False",
       "tests/test_memory_defaults.py::test_restart_starts_the_ring_over"),
    _m("layer-ring-unbounded",
       "the DEQ layer's default history is a bounded ring (16 forward, 8 backward)",
       "deq_ext/layer.py",
       "        memory = min(DEFAULT_MEMORY[direction], self.max_iter)",
       "        memory = self.max_iter",
       "tests/test_memory_defaults.py::test_settings_resolve_to_the_bounded_restarting_ring",
       "tests/test_memory_defaults.py::test_the_layer_runs_its_solves_with_the_default_rings"),
    _m("layer-ring-no-restart",
       "the DEQ layer's default ring restarts when full",
       "deq_ext/layer.py",
       'options={"restart": True, **self.options}', 'options=dict(self.options)',
       "tests/test_memory_defaults.py::test_settings_resolve_to_the_bounded_restarting_ring"),
    Mutant("forward-history-kept-for-backward",
           "the forward history is freed before the adjoint solve allocates its own",
           "deq_ext/layer.py",
           (("    kwargs = {\"compact\": compact, **fwd.resolved(\"forward\").solver_kwargs()}",
             "    kwargs = {\"compact\": compact, **fwd.resolved(\"forward\").solver_kwargs(),\n"
             "              \"return_state\": True}"),
            ("        adjoint = AdjointMap(f, f_inputs, fz, z_leaf, grad, rerecord_below, autocast)",
             "        _ = res\n"
             "        adjoint = AdjointMap(f, f_inputs, fz, z_leaf, grad, rerecord_below, autocast)")),
           ("tests/test_memory_defaults.py::"
            "test_the_forward_history_is_gone_before_the_adjoint_allocates_its_own",)),
    _m("memory-target-share",
       "the memory table judges the DEQ against 14% of the unrolled model",
       "benchmarks/memory_table.py",
       '"pass": deep["deq_share"] <= limit,', '"pass": True,',
       "tests/benchmarks/test_tables.py::test_memory_table_runs_and_is_consistent"),
    _m("memory-history-label",
       "the memory table counts the history's bytes at the peak",
       "benchmarks/memory_table.py",
       'return "history" if t.dim() == 3', 'return None if t.dim() == 3',
       "tests/benchmarks/test_tables.py::test_peak_tracker_sees_the_solver_workspace",
       "tests/benchmarks/test_tables.py::test_memory_table_runs_and_is_consistent"),
    _m("max-iter-ratio-inverted",
       "the max_iter part compares max_iter 200 against 20 and judges the ratio",
       "benchmarks/memory_table.py",
       'r = ratio(hi[f"{what}_peak_bytes"], lo[f"{what}_peak_bytes"])',
       'r = ratio(lo[f"{what}_peak_bytes"], hi[f"{what}_peak_bytes"])',
       "tests/benchmarks/test_tables.py::test_memory_table_max_iter_part"),
    _m("plateau-inverted",
       "the plateau schedule anneals when the loss rises above the earlier best",
       "train/loop.py",
       "and loss > min(past) and", "and loss < min(past) and",
       "tests/train/test_config.py::"
       "test_plateau_anneals_when_the_loss_is_above_the_best_before_the_patience_window"),
    _m("plateau-a-step-late",
       "an annealing evaluation lowers the rate of the very next step",
       "train/loop.py",
       "group[\"lr\"] *= cfg.lr_decay", "group[\"lr\"] *= 1.0",
       "tests/train/test_config.py::test_a_run_with_the_plateau_schedule_anneals_and_logs_it"),
    _m("no-buckets",
       "f runs on power-of-two buckets of the active rows, at most twice their number",
       "deq_ext/solvers/_buckets.py",
       "    return batch if p >= batch else p", "    return batch",
       "tests/test_loop.py::test_f_runs_on_power_of_two_buckets"),
    _m("counts-not-late",
       "on a GPU the host reads the counts one check late (never waiting for the device)",
       "deq_ext/solvers/_counts.py",
       "            k = (self.pushed - 1 - self.lag) % len(self.slots)",
       "            k = (self.pushed - 1) % len(self.slots)",
       "tests/test_loop.py::test_late_counts_cost_one_masked_iteration"),
    _m("history-allocated-up-front",
       "the history grows with the steps taken, not with max_iter",
       "deq_ext/solvers/_history.py",
       "        need = min(self.m, slots)", "        need = self.m",
       "tests/test_history_growth.py::test_history_bytes_follow_the_steps_taken"),
    _m("chunk-rows-misplaced",
       "a chunked DEQ gives each sample the gradient of the whole batch's solve",
       "deq_ext/chunks.py",
       "grads[k][start:stop] = g", "grads[k][:stop - start] = g",
       "tests/test_chunks.py::test_chunks_give_the_whole_batch_results"),
    _m("chunk-captured-weight-per-chunk",
       "a weight f captures is differentiated through once for all the chunks",
       "deq_ext/chunks.py",
       "elif next_node._sequence_nr() < first:", "elif False:",
       "tests/test_chunks.py::test_a_captured_weight_is_differentiated_once_for_all_chunks"),
    _m("chunk-auto-off",
       "chunk='auto' solves a large CPU batch in 4 chunks",
       "deq_ext/chunks.py",
       "    return math.ceil(batch / AUTO_CHUNKS)", "    return None",
       "tests/test_chunks.py::test_auto_chunks_a_large_cpu_batch"),
)


def apply(mutant: Mutant) -> str:
    """Writes the mutated file; returns the original text (raises if a snippet is not unique)."""
    path = ROOT / mutant.file
    original = path.read_text()
    text = original
    for old, new in mutant.edits:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"{mutant.id}: the snippet occurs {count} times in {mutant.file} "
                             f"(the mutant list is stale): {old!r}")
        text = text.replace(old, new)
    try:  # a mutant that does not even compile would be "killed" for nothing
        compile(text, str(path), "exec")
    except SyntaxError as exc:
        raise ValueError(f"{mutant.id}: the mutated {mutant.file} does not compile: {exc}")
    path.write_text(text)
    return original


def run_tests(mutant: Mutant) -> tuple[bool, str]:
    """(the tests passed, the tail of their output)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "-o", "addopts=", *mutant.tests]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    # Exit code 5: no test was collected, which must not count as a kill.
    if proc.returncode == 5:
        raise ValueError(f"{mutant.id}: no test collected by {' '.join(mutant.tests)}")
    return proc.returncode == 0, tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--only", nargs="*", help="run only these mutant ids")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.id:<38} {m.file:<28} {m.claim}")
        return 0
    survivors, errors = [], []
    start = time.time()
    for i, m in enumerate(mutants, 1):
        t0 = time.time()
        try:
            original = apply(m)
        except ValueError as exc:
            errors.append(str(exc))
            print(f"[{i}/{len(mutants)}] {m.id}: NOT APPLIED: {exc}", flush=True)
            continue
        try:
            passed, tail = run_tests(m)
        except ValueError as exc:
            errors.append(str(exc))
            passed, tail = False, str(exc)
        finally:
            (ROOT / m.file).write_text(original)
        verdict = "SURVIVED" if passed else "killed"
        print(f"[{i}/{len(mutants)}] {m.id:<38} {verdict:<9} {time.time() - t0:5.1f}s  "
              f"({m.claim})", flush=True)
        if passed:
            survivors.append(m.id)
            print("    " + tail.replace("\n", "\n    "), flush=True)
    print(f"mutation check: {len(mutants) - len(survivors) - len(errors)} of {len(mutants)} "
          f"killed, {len(survivors)} survived, {len(errors)} not applied "
          f"({time.time() - start:.0f} s)")
    for e in errors:
        print("  error:", e)
    return 1 if survivors or errors else 0


if __name__ == "__main__":
    sys.exit(main())
