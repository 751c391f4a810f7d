"""The search stage: a trained supernet's configs scored on held-out images, one chosen per
budget by a strategy (greedy, evolution, random), resumable from its state file."""
from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from compress.data.source import DataSource
from compress.errors import CompressError
from compress.latency import LatencyModel
from compress.latency.budget import best_under, corrected_cuts, public
from compress.latency.build import BesideUnpruned
from compress.pruning.space import ChannelConfig
from compress.search import RESULT_FILE, Budget, Evaluator, budgets_for, plain_entry, run_search, write_results
from compress.settings import HeldOutScoring, LutSettings, SearchSettings
from compress.stages.exporting import latency_table, lut_model_space
from compress.stages.folders import device, digest
from compress.stages.supernets import held_out, supernet_file
from compress.supernet import Supernet, load_supernet
from compress.training import distributed
from compress.units import parse_count, parse_latency

SEARCH_TRIES = 3  # each try after the first is a search of its own


@dataclass
class SearchRun:
    result: dict  # what search.json holds: per target its config, MACs, params, held-out top-1
    folder: Path
    evaluator: Evaluator


def open_search(run: str | Path, scoring: HeldOutScoring, folder: Path, data=None,
                lut: str | Path | None = None, model: nn.Module | None = None
                ) -> tuple[Supernet, dict, Evaluator, LatencyModel | None]:
    """The supernet of run folder `run`, its record, an Evaluator whose cache (the search
    state) lives in `folder`, fingerprinted with everything its scores depend on, and the
    latency model `lut` (or None)."""
    path = supernet_file(run)
    supernet, record = load_supernet(path, model=copy.deepcopy(model))
    source = DataSource.of(data) if data is not None else None
    fingerprint = {"supernet": digest(path), "data": source.name if source else record["holdout"]["data"],
                   "holdout": record["holdout"]["count"], "holdout_seed": record["holdout"]["seed"],
                   "recal_images": scoring.recal_images, "eval_images": scoring.eval_images,
                   **({"score_size": scoring.score_size} if scoring.score_size else {})}
    latency = None
    if lut:
        latency = LatencyModel.load(lut, supernet.space)
        fingerprint["lut"] = digest(Path(lut))
    evaluator = Evaluator(supernet, held_out(supernet, record["holdout"], scoring, data), device(),
                          latency=latency.predict if latency else None, state_path=folder / "state.json",
                          fingerprint=fingerprint)
    return supernet, record, evaluator, latency


def search(run: str | Path, settings: SearchSettings, out: str | Path | None = None, lut: str | Path | None = None,
           data=None, quiet: bool = False, model: nn.Module | None = None, clock: LutSettings = LutSettings()
           ) -> SearchRun:
    """Search the supernet of run folder `run` for one config per target of `settings`;
    results (search.json, search.csv, search.png, the resumable state.json) go to `out`
    (default RUN/search-METHOD). With latency targets, the latency model `lut` predicts
    latency (default: this machine's cached one for `clock`, the one `prune --latency` uses
    for the same space, built when missing and copied into `out`), and the chosen configs are
    then timed for real and searched again where they miss (_meet_latency). `data`: the
    supernet's data at another path, or the Loaders a supernet trained on your own loaders was
    trained with; `model`: the unpruned model of a supernet of your own architecture (a zoo or
    source model is rebuilt)."""
    run = Path(run)
    folder = Path(out) if out else (run if run.is_dir() else run.parent) / f"search-{settings.method}"
    distributed.init()
    if any(t.latency for t in settings.targets) and not lut:
        lut = folder / "latency_model.json"
        if distributed.is_main():  # built once; the other ranks read the file
            latency_table(*lut_model_space(run, model=model), clock, lut, progress=not quiet)
        distributed.barrier()
    supernet, _, evaluator, latency = open_search(run, settings, folder, data, lut, model)
    budgets = budgets_for(supernet.space, settings.targets, latency)
    log = None if quiet or not distributed.is_main() else (lambda msg: print(msg, flush=True))
    if log and evaluator.cache:
        log(f"resuming: {len(evaluator.cache)} configs already scored in {folder / 'state.json'}")
    # on every rank, as scoring is collective (on the main rank alone, its scoring paired with
    # another rank's next one and the ranks drifted apart); a cached score times nothing
    if not quiet and evaluator.space.max() not in evaluator.cache:
        estimate = _estimate(evaluator, settings, budgets)
        if log:
            log(estimate)
    result = run_search(evaluator, settings.method, budgets, seed=settings.seed, options=settings.strategy_options(),
                        progress=log)
    result.update(supernet=str(run), evaluation=evaluator.fingerprint)
    if lut:
        _meet_latency(result, settings, budgets, evaluator, latency, log)
    write_results(folder, result, evaluator)
    distributed.barrier()
    return SearchRun(result, folder, evaluator)


def _estimate(evaluator: Evaluator, settings: SearchSettings, budgets: list) -> str:
    """How long the search will take here, said before it starts: the candidates the method
    scores, times one candidate's measured cost (the full config, which the search scores anyway)."""
    began = time.perf_counter()
    evaluator.score(evaluator.space.max())
    each = time.perf_counter() - began
    space, full = evaluator.space, evaluator.space.macs(evaluator.space.max())
    # greedy: one trial per group per step, each step `greedy_step` of the MACs, down to the smallest budget
    lowest = min((b.macs for b in budgets if b.macs), default=full // 2)
    greedy = len(space.groups) * math.ceil(math.log(max(lowest, 1) / full) / math.log(1 - settings.greedy_step))
    count = {"greedy": greedy, "random": settings.samples * len(budgets),
             "evolution": (settings.population + settings.iterations * (settings.mutations + settings.crossovers))
             * len(budgets)}
    minutes = count[settings.method] * each / 60
    other = "" if settings.method == "greedy" else f"; --method greedy scores about {greedy} (~{greedy * each / 60:.0f} min)"
    return (f"search: about {count[settings.method]} candidates at {each:.1f} s each ({settings.recal_images} BN "
            f"recalibration + {settings.eval_images} scoring images), about {minutes:.0f} min here{other}")


def _meet_latency(result: dict, settings: SearchSettings, budgets: list[Budget], evaluator: Evaluator,
                  fitted: LatencyModel, log: Callable[[str], None] | None) -> None:
    """The latency model screened the candidates; each chosen config is timed for real on its
    clock, beside the unpruned file, and a latency target whose pick measures over its budget
    (or more than TOLERANCE under it) is searched again under a target corrected from the
    measurement, as `prune --latency` re-cuts: a search's picks are unlike the model's random
    samples, and on MobileNetV2 at 224 px it predicted the greedy picks 16% fast on one machine
    and 5-10% slow on another (benchmarks/RESULTS.md). Greedy walks its cached path further; evolution and random search
    anew. Only the main rank times; every rank takes its times, so all search alike."""
    clock, space = fitted.clock(), evaluator.space
    with tempfile.TemporaryDirectory() as tmp:
        main = distributed.is_main()
        timer = BesideUnpruned(evaluator.supernet.plain_copy(), space, clock, Path(tmp)) if main else None

        def unpruned_ms() -> float:
            return distributed.from_main(timer and timer.unpruned_ms)

        def measure(config: ChannelConfig) -> float:
            return distributed.from_main(timer and timer([config])[0][0])

        for target, budget, t in zip(settings.targets, budgets, result["targets"]):
            first = ChannelConfig(t["config"])
            if budget.latency_ms is None:
                t.update(measured_ms=measure(first) * unpruned_ms(), measured_on=clock.describe(),
                         measured_within_budget=True)
                continue
            attempts = corrected_cuts(_research(evaluator, settings, budget, first, log), measure, fitted,
                                      target.latency, unpruned_ms, clock, SEARCH_TRIES,
                                      budget.latency_ms / fitted.unpruned_ms)
            now = unpruned_ms()
            limit = parse_latency(target.latency, now)  # a share is of the unpruned file timed now
            chosen = best_under(attempts, limit / now) or min(attempts, key=lambda a: a["measured"])
            t.update(plain_entry(evaluator.score(chosen["config"])), measured_ms=chosen["measured"] * now,
                     measured_budget_ms=limit, measured_on=clock.describe(), latency_attempts=public(attempts, now),
                     measured_within_budget=chosen["measured"] <= limit / now)
            if not t["measured_within_budget"]:
                print(f"warning: {t['label']}: after {len(attempts)} searches the fastest pick measured "
                      f"{t['measured_ms']:.3f} ms on {clock.describe()}, over the {limit:.3f} ms budget; "
                      "the machine may be busy (search again: scored configs are kept), or prune to it directly "
                      "(`chansearch prune --latency`).", file=sys.stderr)
    result.update(evaluated=len(evaluator.cache), evaluated_now=evaluator.fresh)


def _research(evaluator: Evaluator, settings: SearchSettings, budget: Budget, first: ChannelConfig,
              log: Callable[[str], None] | None) -> Callable[[float], ChannelConfig | None]:
    """The search of `budget` again with its latency limit moved to a predicted-ms target;
    the first pick (found under the budget itself) is not searched twice."""
    def cut(target_ms: float) -> ChannelConfig | None:
        if math.isclose(target_ms, budget.latency_ms):  # the first target, back from a share
            return first
        if log:
            log(f"{budget.label()}: searching again under a predicted {target_ms:.3f} ms, corrected by the measurement")
        try:
            found = run_search(evaluator, settings.method, [replace(budget, latency_ms=target_ms)], seed=settings.seed,
                               options=settings.strategy_options(), progress=log)
        except CompressError as exc:  # e.g. too tight for random draws: keep the picks measured so far
            if log:
                log(f"{budget.label()}: no search under {target_ms:.3f} ms ({exc})")
            return None
        return ChannelConfig(found["targets"][0]["config"])
    return cut


def find_search(run: str | Path, search_dir: str | Path | None = None) -> Path:
    """The one search folder of a supernet run (or `search_dir`), holding search.json."""
    if search_dir:
        path = Path(search_dir)
        if not (path / RESULT_FILE).is_file():
            raise CompressError(f"'{path}' holds no {RESULT_FILE}; run the search first.")
        return path
    found = sorted(p.parent for p in Path(run).glob(f"search-*/{RESULT_FILE}"))
    if not found:
        raise CompressError(f"'{run}' holds no search results (search-*/{RESULT_FILE}); run the search first.")
    if len(found) > 1:
        raise CompressError(f"'{run}' holds several searches ({', '.join(p.name for p in found)}); "
                            "choose one (`search`).")
    return found[0]


def search_target(result: dict, target: str | None, where: str = RESULT_FILE) -> dict:
    """One target of a search result, by its label (`macs<=150.00M`), its limit (`150.00M`)
    or a MAC count / percentage within 0.1% of its MAC budget."""
    targets = result["targets"]
    if target is None:
        if len(targets) != 1:
            raise CompressError(f"{where} has {len(targets)} targets ({', '.join(t['label'] for t in targets)}); "
                                "pick one (`target`).")
        return targets[0]
    wanted = [t for t in targets if target in (t["label"], t["label"].split("<=")[-1])]
    if not wanted and all(t["budget"]["macs"] for t in targets):
        full = result["full"]["macs"]
        macs = parse_count(target, "MAC target", full=full)
        wanted = [t for t in targets if abs(t["budget"]["macs"] - macs) <= 0.001 * full]
    if not wanted:
        raise CompressError(f"no target '{target}' in {where}; it has {', '.join(t['label'] for t in targets)}.")
    return wanted[0]
