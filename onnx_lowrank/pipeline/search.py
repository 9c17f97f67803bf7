"""Aim at accuracy instead of a guessed speedup: the fastest plan whose measured fidelity on the
held-out set meets a budget (NNCF's ``quantize_with_accuracy_control(max_drop)``, AIMET's greedy
compression-ratio selection with an eval callback, Olive's accuracy goals).

The analysis (load, responses, statistics) runs once. The speedup is then searched in phases,
each cheaper per plan than the next, so that the search costs a few fixed-speedup runs:

1. *Probes*: the method's own plans at bracketing, then interpolated, speedups
   (``planning.bracket``), solved cheaply: a channel method's with the linear solver (PCA of the
   responses, Eq. 4, nested: one decomposition gives every rank), re-collecting nothing; asym3d's
   as the symmetric 3d chain with the solver's closed-form start, its split layers' outputs from
   bases that one run of the network keeps for every plan the bracket can still probe
   (``methods.split_basis``). A layer's chain at the same ranks is built once for all probes;
   each probe is measured on the held-out set against the original's outputs, computed once; a
   plan probed before (same ranks) is not measured again. Methods without iterations are their
   own probes.
2. *Quick runs of the method* (a fifth of the solver's schedule), two or three: at the fastest
   probe that met the budget, which measures the method's gain over its probe, then where the
   probes scaled by that gain meet it (halfway down, twice, where the first missed); a third
   where the two predictions of the next step disagree (``_beyond``). Where the first probe
   misses, the method runs there first; where no faster plan is feasible, in full at once.
3. *The method itself*, with the paper's schedule: first where its quick runs say it meets
   the budget (their power law, or its probes scaled by its latest gain), then, should that
   miss, at the fastest plan whose quick run met. Only a plan measured with the method itself
   is ever the answer, so the budget is met on held-out data by the model that is returned.
4. With ``--quantize int8``, the answer is the INT8 model: the plan found is quantized with the
   budget as the INT8 guard's tolerance (nodes that break it kept in float), and where no INT8
   model of it meets the budget, slower plans are (``pipeline.budget_int8``).

Every plan measured is a point of the frontier (theoretical speedup vs metric) in the report.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from onnx_lowrank.distill import require as require_distillation
from onnx_lowrank.errors import BudgetNotMetError, InfeasibleTargetError, InvalidOptionError, InvalidTypeError
from onnx_lowrank.measure.fidelity import held_out_outputs
from onnx_lowrank.methods.chains import CLOSED_FORM, PROBE_SCHEDULE
from onnx_lowrank.methods.split_basis import KEY as BASIS
from onnx_lowrank.options import Options, takes_options
from onnx_lowrank.output.report import PROBE_LABEL, QUICK_SUFFIX, FrontierPoint
from onnx_lowrank.pipeline.analysis import Analysis, Result, analyse
from onnx_lowrank.pipeline.budget import Budget
from onnx_lowrank.pipeline.budget_int8 import budget_tolerance, int8_within_budget
from onnx_lowrank.pipeline.compress import distill, hint_tensors, measure, report_for, rewrite, solve
from onnx_lowrank.pipeline.plan import plan_for
from onnx_lowrank.pipeline.probe_bases import keep_bracket_bases
from onnx_lowrank.planning.bracket import METHOD_PRECISION, PRECISION, extrapolated, next_probe
from onnx_lowrank.quantize import add_int8
from onnx_lowrank.solvers.nonlinear import PAPER_SCHEDULE

log = logging.getLogger(__name__)


PROBES = 7  # probes per bracket: doubling or halving, then interpolation
QUICK_RUNS = 2  # the method's gain over its probe, measured at one or two plans
QUICK_GAP = 0.02  # a full run's loss is within 2 % of its quick run's (CRAFT, the demo, VGG-16)


@takes_options
def compress_to_budget(model, budget: Budget, *, calibration=None, evaluation=None, preprocess=None,
                       progress=None, speedup: float = 2.0, **options) -> Result:
    """The fastest plan of ``model`` whose fidelity on held-out data meets ``budget``. Keywords
    are those of :func:`onnx_lowrank.compress`, without ``speedup`` (``speedup`` here is only where
    the search starts, 2 by default). Raises BudgetNotMetError when no decomposition meets it."""
    if not isinstance(budget, Budget):
        raise InvalidTypeError(f"budget must be a Budget, got {type(budget).__name__} {budget!r}",
                               hint="e.g. Budget('error', 0.05) or Budget('agreement', 0.99)")
    opts = Options.from_keywords(speedup=speedup, **options)
    if opts.distill:
        require_distillation(opts.distill_device)
    if opts.dry_run:
        raise InvalidOptionError("a budget search measures models; it has no dry run", hint="drop --dry-run")
    clock = time.perf_counter()
    analysis = analyse(model, opts, calibration, evaluation, preprocess, progress, fixed_target=False,
                       needs_labels="--max-drop" if budget.kind == "drop" else None)
    data = analysis.data
    labels = data.held_out_labels()
    with analysis.run.stage("reference", "running the original on the held-out set"):
        reference = held_out_outputs(analysis.reference, data, opts.threads)
    searcher = _Searcher(analysis, opts, budget, reference, labels)
    best = searcher.run(speedup)
    int8 = None
    if best is not None and opts.quantize:
        best, int8 = int8_within_budget(searcher, best)
    if best is None:
        raise BudgetNotMetError(f"no decomposition{' with INT8 on top' if opts.quantize else ''} meets "
                                f"{budget.describe()}: the best measured was {searcher.best_measured()}",
                                hint="loosen the budget, or give more calibration data")
    point, solved, optimized, outputs = best
    final_opts = dataclasses.replace(opts, speedup=point.speedup_target)
    report = report_for(analysis, searcher.plans[point.speedup_target], solved, final_opts)
    ending = analysis.ending()
    undistilled = optimized
    if opts.distill:  # the plan found, trained; kept only where it measures better on the held-out data
        optimized = distill(ending.measuring, optimized, hint_tensors(analysis, solved), report, final_opts)
    distilled = optimized is not undistilled
    measure(ending.measuring, optimized, report, final_opts, reference, None if distilled else outputs)
    if int8 is not None:  # the budget was met by the INT8 model: that is the answer, and its figure
        optimized = add_int8(ending.measuring, optimized, report, final_opts,
                             lowrank_int8=None if distilled else int8[1], tolerance=budget_tolerance(budget, labels))
        point = int8[0] if report.int8["written"] == "int8" and not distilled else point
    if distilled:  # the model written is measured again by the budget, and marked in the frontier
        value = budget.value(reference, held_out_outputs(optimized, data, opts.threads, produced=True), labels)
        int8_written = report.int8 is not None and report.int8["written"] == "int8"
        point = FrontierPoint(point.speedup_target, point.theoretical_speedup, value, budget.met(value),
                              f"{opts.method} (distilled{' + int8' if int8_written else ''})")
        searcher.frontier.append(point)
    report.budget = {"target": budget.describe(), "kind": budget.kind, "limit": budget.limit,
                     "measured": point.value, "met": point.met, "held_out_samples": len(data.holdout_indices),
                     "search_s": time.perf_counter() - clock}
    report.frontier = sorted(searcher.frontier, key=lambda p: (p.theoretical_speedup or math.inf, p.solver))
    log.info("budget met: %s measured %.4g at a theoretical conv speedup of %.2fx", budget.describe(), point.value,
             point.theoretical_speedup)
    return ending.finish(optimized, report)


class _Searcher:
    def __init__(self, analysis: Analysis, opts: Options, budget: Budget, reference: dict, labels) -> None:
        self.analysis, self.opts, self.budget = analysis, opts, budget
        self.reference, self.labels = reference, labels
        self.frontier: list[FrontierPoint] = []
        self.plans: dict[float, object] = {}
        self.cache: dict = {}  # (layer, rank) -> chain of a symmetric solve, shared by all plans
        self.probes: dict[float, float] = {}  # speedup -> the probe's measured value
        self.probed_plans: dict[tuple, float] = {}  # a probe's plan (its ranks) -> its measured value
        self.infeasible: set[float] = set()
        self.quick: dict[float, FrontierPoint] = {}  # speedup -> the method's quick run there
        # Only the solver's iterations differ between a quick run and the method: without any
        # (PCA, data-free baselines) every run of the method is already the answer's.
        self.iterative = opts.spec.iterative
        self.kept = None  # without iterations: the fastest run of the method that met the budget
        self.predicted: float | None = None  # where the method's full run goes first, faster than its quick runs met
        self.confirmed = None  # the method's full run, where it ran before any quick run and met (at the limit)

    def run(self, start: float):
        """The method's run that meets the budget at the fastest plan the search found, or None.
        Where the first probe misses, the method runs there before any probe goes lower: it may
        meet the budget where its probe does not (far better than its probe, as a 3d chain can
        be), and then the search goes up from there instead."""
        self._probe(start)
        if start in self.probes and not self.budget.met(self.probes[start]):
            point = self._quick_run(start)
            if point is not None and point.met:
                return self._confirm(self._beyond(point))
        # With iterations, the first bracket only places the first quick run: to within 10 %.
        chosen = self._choose(*self._probe_bracket(start, precision=METHOD_PRECISION if self.iterative else PRECISION))
        return None if chosen is None else self._confirm(chosen)

    def _choose(self, passing: float | None, failing: float | None) -> FrontierPoint | None:
        """Where to solve the method in full, from its quick runs: first where the probes met the
        budget, which measures the method's gain over its probe; then faster where that gain
        says the method meets it too (``_beyond``); where it missed, halfway down, twice. When no
        probe met the budget, where they came closest, and up from there should it meet it."""
        if passing is None:
            point = None if failing is None else self._quick_run(failing)
            return self._beyond(point) if point is not None and point.met else None
        if self.iterative and failing in self.infeasible:  # closed to the finest precision: a plan costs no run
            passing, failing = self._probe_bracket(passing)
        point = self._run_at_the_limit(passing, failing) or self._quick_run(passing)
        if point is not None and point.met:
            return point if self.confirmed is not None else self._beyond(point)
        high = passing
        for _ in range(2):
            high = 1 + (high - 1) / 2
            point = self._quick_run(high)
            if point is not None and point.met:
                return point
        return None

    def _confirm(self, chosen: FrontierPoint):
        """The method with the paper's schedule where its quick runs predict it meets the budget
        (``predicted``), else at the chosen plan; should it miss, at the next slower plan whose
        quick run met. Only a run measured this way is ever the answer, so the budget is met on
        held-out data by the model that is returned."""
        if not self.iterative:
            return self.kept
        if self.confirmed is not None:
            return self.confirmed
        self._let_the_bases_go()
        speedups = sorted((s for s, p in self.quick.items() if p.met and s <= chosen.speedup_target), reverse=True)
        for speedup in [self.predicted] * (self.predicted is not None) + speedups:
            result = self.evaluate(speedup, self.opts, self.opts.method)
            if result is not None and result[0].met:
                return result
        return None

    def _run_at_the_limit(self, passing: float, failing: float | None) -> FrontierPoint | None:
        """Where no faster plan is feasible (to the bracket's precision), a quick run at ``passing``
        could only confirm it: the method runs there in full at once (VGG-16's loose budgets), the
        answer if it meets the budget, else a quick run that missed. None where this does not apply."""
        if not self.iterative or failing not in self.infeasible or failing > passing * (1 + PRECISION):
            return None
        self._let_the_bases_go()
        result = self.evaluate(passing, self.opts, self.opts.method)
        if result is None:
            return None
        if result[0].met:
            self.confirmed = result
        else:
            self.quick[passing] = result[0]
        return result[0]

    def _let_the_bases_go(self) -> None:
        """No probe runs after the method's full run: its split bases are let go first."""
        self.cache = {key: value for key, value in self.cache.items() if key[0] != BASIS}

    def _quick_run(self, speedup: float) -> FrontierPoint | None:
        """The method itself at ``speedup``, with a fifth of the solver's schedule (within a few per
        cent of the full schedule's error) where it iterates: it ranks plans at a fifth of the cost."""
        if speedup in self.quick:
            return self.quick[speedup]
        if not self.iterative:
            result = self.evaluate(speedup, self.opts, self.opts.method)
            if result is not None and result[0].met and (self.kept is None or speedup > self.kept[0].speedup_target):
                self.kept = result
        else:
            result = self.evaluate(speedup, self.opts, self.opts.method + QUICK_SUFFIX, PROBE_SCHEDULE)
        if result is None:
            return None
        self.quick[speedup] = result[0]
        return result[0]

    def _beyond(self, best: FrontierPoint) -> FrontierPoint:
        """The second quick run, where the probes scaled by the method's gain over its probe at
        ``best`` meet the budget (``_next_speedup``), kept if it meets the budget itself; then
        where the full run goes first (``predicted``): the nearer of where the method's own power
        law (``_method_step``) and its probes scaled by its latest gain reach the budget; where
        those disagree by more than ``METHOD_PRECISION``, a third quick run at the farther one
        decides; between the fastest quick run that met and a faster one that missed, where the
        power law through them reaches the budget. A quick run re-collects and solves the
        network, a third of a run: the method's gain is measured at two or three plans."""
        if len(self.quick) < QUICK_RUNS:
            best = self._quick_above(best, self._next_speedup(best))
        if self._missed_above(best) is None:
            steps = sorted(filter(None, (self._method_step(best), self._next_speedup(best))))
            if len(steps) < 2 or steps[1] <= steps[0] * (1 + METHOD_PRECISION):
                self.predicted = steps[0] if steps else None
                return best
            best = self._quick_above(best, steps[1])
        missed = self._missed_above(best)
        if missed is not None:
            losses = self._losses(best.value, self.quick[missed].value)
            self.predicted = next_probe(best.speedup_target, missed, losses)
        return best

    def _quick_above(self, best: FrontierPoint, speedup: float | None) -> FrontierPoint:
        point = None if speedup is None or speedup in self.quick else self._quick_run(speedup)
        return point if point is not None and point.met else best

    def _missed_above(self, best: FrontierPoint) -> float | None:
        return min((s for s, p in self.quick.items() if s > best.speedup_target and not p.met), default=None)

    def _losses(self, passing: float, failing: float) -> tuple[float, float, float] | None:
        """The losses of a quick run that met and one that missed, and the budget's less
        ``QUICK_GAP``, for ``next_probe``: where the one that met is that near the budget, a
        faster plan would meet it by chance (VGG-16 on its error floor: 0.0995 at 1.13x, 0.1004
        at 2x, a budget of 0.1). None where the budget has no loss (a user metric)."""
        limit = self.budget.loss(self.budget.limit)
        losses = (self.budget.loss(passing), self.budget.loss(failing), None if limit is None else limit / (1 + QUICK_GAP))
        return None if None in losses else losses

    def _method_step(self, best: FrontierPoint) -> float | None:
        """Where the power law through the method's two fastest quick runs that met (``best`` and
        the one below it) reaches the budget, a little below and at most twice ``best``'s
        speedup; None where there is no such run or the losses cannot say (not rising)."""
        below = max((s for s, p in self.quick.items() if s < best.speedup_target and p.met), default=None)
        limit = self.budget.loss(self.budget.limit)
        if below is None or limit is None:
            return None
        return extrapolated(below, best.speedup_target,
                            (self.budget.loss(self.quick[below].value), self.budget.loss(best.value), limit))

    def _next_speedup(self, point: FrontierPoint) -> float | None:
        """Where the method beats its probe by a factor k in loss (error, points, disagreement),
        the fastest probe whose loss times k meets the budget; where it lost nothing at all (a
        ratio says nothing), the next probe above it. Never a plan the method already ran."""
        probe_loss = self.budget.loss(self.probes.get(point.speedup_target, math.nan))
        method_loss = self.budget.loss(point.value)
        if probe_loss is None or method_loss is None or not probe_loss > 0 or not method_loss < probe_loss:
            return None
        if method_loss <= 0:
            faster = min((s for s in self.probes if s > point.speedup_target), default=None)
        else:
            faster, _ = self._probe_bracket(point.speedup_target, scale=method_loss / probe_loss)
        if faster is None or faster in self.quick or faster <= point.speedup_target * (1 + PRECISION):
            return None
        return faster

    def _probe_bracket(self, start: float, scale: float = 1.0,
                       precision: float = PRECISION) -> tuple[float | None, float | None]:
        """The fastest probed speedup that meets the budget and the slowest faster one that does
        not; with ``scale``, a probe meets it when its loss times ``scale`` does. Starts from the
        probes already measured (at ``start`` when there are none), then brackets and bisects."""
        def met(speedup: float) -> bool:
            value = self.probes.get(speedup)
            return value is not None and self._probe_met(value, scale)

        def losses() -> tuple[float, float, float] | None:
            limit = self.budget.loss(self.budget.limit)
            if passing is None or failing is None or failing not in self.probes or limit is None:
                return None
            return self.budget.loss(self.probes[passing]), self.budget.loss(self.probes[failing]), limit / scale

        known = sorted(set(self.probes) | self.infeasible)
        passing = max((s for s in known if met(s)), default=None)
        failing = min((s for s in known if not met(s) and (passing is None or s > passing)), default=None)
        speedup = start if passing is None and failing is None else next_probe(passing, failing, losses(), precision=precision)
        for _ in range(PROBES):
            if speedup is None:
                break
            self._probe(speedup)
            if met(speedup):
                passing = speedup
            else:
                failing = speedup
            speedup = next_probe(passing, failing, losses(), precision=precision)
        return passing, failing

    def _probe(self, speedup: float) -> None:
        """Measure the symmetric probe at ``speedup`` into ``probes``, unless its plan (the same
        ranks as a plan probed before) was measured already."""
        if speedup in self.probes or speedup in self.infeasible:
            return
        if self.opts.spec.probe_solver is None:  # the method costs what a probe costs: its runs are the probes
            point = self._quick_run(speedup)
            if point is not None:
                self.probes[speedup] = point.value
            return
        plan = self._plan(speedup, self.opts)
        if plan is None:
            return
        key = (tuple(sorted(plan.ranks.items())), tuple(sorted(plan.spatial_ranks.items())))
        if key not in self.probed_plans:
            keep_bracket_bases(self.analysis, self.opts, plan, speedup, self.probes, self.cache)
            # Each layer from the original's inputs: an asymmetric method's probe is its symmetric form.
            opts = dataclasses.replace(self.opts, symmetric=True) if self.opts.spec.asymmetric else self.opts
            result = self.evaluate(speedup, opts, PROBE_LABEL, CLOSED_FORM, plan, self.opts.spec.probe_solver)
            self.probed_plans[key] = result[0].value
        self.probes[speedup] = self.probed_plans[key]

    def _probe_met(self, value: float, scale: float) -> bool:
        if scale == 1.0:
            return self.budget.met(value)
        loss = self.budget.loss(value)
        return loss * scale <= self.budget.loss(self.budget.limit) if loss is not None else self.budget.met(value)

    def _plan(self, speedup: float, opts: Options):
        try:
            return plan_for(self.analysis, dataclasses.replace(opts, speedup=speedup))
        except InfeasibleTargetError:
            self.frontier.append(FrontierPoint(speedup, None, None, False, "infeasible"))
            self.infeasible.add(speedup)
            return None

    def evaluate(self, speedup: float, opts: Options, label: str, schedule=PAPER_SCHEDULE, plan=None, solver=None):
        """Plan, solve (with ``solver`` in place of the method's), rewrite and measure at ``speedup``: the point, what was
        solved, the model and its held-out outputs (the answer's are its fidelity's); None when
        the plan is infeasible."""
        opts = dataclasses.replace(opts, speedup=speedup)
        plan = plan or self._plan(speedup, opts)
        if plan is None:
            return None
        # The cache also keeps the responses for the next plan.
        solved = solve(self.analysis, plan, opts, cache=self.cache, schedule=schedule, solver=solver)
        optimized = rewrite(self.analysis, solved, logging.DEBUG)
        data = self.analysis.data
        with self.analysis.run.stage("search", f"measuring the plan at {speedup:.2f}x", logging.DEBUG):
            outputs = held_out_outputs(optimized, data, opts.threads, produced=True)
        value = self.budget.value(self.reference, outputs, self.labels)
        point = FrontierPoint(speedup, plan.speedup, value, self.budget.met(value), label)
        self.frontier.append(point)
        self.plans[speedup] = plan
        log.info("%s at %.2fx: %s = %.4g (%s)", point.solver, plan.speedup, self.budget.kind, value,
                 "met" if point.met else "missed")
        return point, solved, optimized, outputs

    def best_measured(self) -> str:
        """The best figure any plan measured, and the lowest speedup measured, for the error."""
        measured = [p for p in self.frontier if p.value is not None]
        if not measured:
            return "nothing (every plan was infeasible)"
        best = (max if self.budget.higher_is_better else min)(measured, key=lambda p: p.value)
        return f"{best.value:.4g} at {min(p.theoretical_speedup for p in measured):.2f}x"
