import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import compress
from compress import CompressError
from compress.latency import LatencyModel, cached_latency_model, clock_of
from compress.pruning.prune import space_for
from compress.search import Budget, Evaluator, HeldOut, parse_budgets, pareto_front
from compress.search.strategies import evolution, greedy
from compress import stages
from compress.settings import HeldOutScoring, LutSettings, PruneSettings, SearchSettings, Target
from compress.stages import held_out
from compress.stages.exporting import latency_table, lut_model_space
from compress.supernet import load_supernet, recalibrate_bn
from compress.data.specs import build_dataset, transforms
from conftest import ROOT, run_cli

IMAGES = ["--recal-images", "16", "--eval-images", "24"]
EVO = ["--method", "evolution", "--population", "6", "--parents", "3", "--mutations", "3", "--crossovers", "3",
       "--iterations", "2", *IMAGES, "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("supernet") / "run"
    done = run_cli("supernet", "mobilenet_v3_small_cifar", "--input-size", "16", "--data", "synthetic:128",
                   "--holdout", "48", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "3", "--workers", "0",
                   "--val-images", "16", *IMAGES, "--quiet", "--out", out)
    assert done.returncode == 0, done.stderr
    return out


def _result(folder):
    return json.loads((folder / "search.json").read_text())


def _targets(result):
    return [(t["label"], t["config"], t["top1"]) for t in result["targets"]]


SCORING = dict(recal_images=16, eval_images=24)
EVOLUTION = SearchSettings(method="evolution", population=6, parents=3, mutations=3, crossovers=3, iterations=2,
                           **SCORING)


def _search(run, out, settings=EVOLUTION, clock=None, **changes):
    return stages.search(run, settings.model_copy(update=changes), out=out, quiet=True,
                         **({"clock": clock} if clock else {})).result


@pytest.mark.slow
def test_greedy_meets_every_target_and_extracts_that_config(run, tmp_path):
    result = _search(run, tmp_path / "g", SearchSettings(method="greedy", greedy_step=0.7, **SCORING),
                     targets=[Target(macs="70%"), Target(macs="45%")])
    assert result == _result(tmp_path / "g")
    full = result["full"]["macs"]
    assert [t["label"] for t in result["targets"]] == [f"macs<={compress.units.human(int(full * p))}" for p in (0.7, 0.45)]
    for t, share in zip(result["targets"], (0.7, 0.45)):
        assert t["macs"] <= int(full * share) == t["budget"]["macs"]
    assert (tmp_path / "g" / "search.png").stat().st_size > 10_000
    rows = (tmp_path / "g" / "search.csv").read_text().splitlines()
    assert len(rows) == result["evaluated"] + 1 and rows[0].startswith("macs,params")

    ext = run_cli("extract", run, "--search", tmp_path / "g", "--target", "45%", "-o", tmp_path / "net.pt")
    assert ext.returncode == 0, ext.stderr
    net = compress.load(tmp_path / "net.pt")
    assert net.card.config == result["targets"][1]["config"]
    assert compress.count(net, 16)[0] == result["targets"][1]["macs"]
    record = torch.load(tmp_path / "net.pt", weights_only=True)
    assert record["provenance"]["created_by"] == "chansearch extract"

    # the same widths cut from the unpruned model's own weights, as `prune --config --data` cuts them
    torch.manual_seed(0)
    teacher = compress.build("mobilenet_v3_small_cifar", num_classes=10, input_size=16)
    compress.save_checkpoint(tmp_path / "teacher.pt", teacher)
    cut = run_cli("extract", run, "--search", tmp_path / "g", "--target", "45%", "--teacher", tmp_path / "teacher.pt",
                  "-o", tmp_path / "cut.pt")
    assert cut.returncode == 0, cut.stderr
    assert "cut from" in cut.stdout
    net = compress.load(tmp_path / "cut.pt")
    assert net.card.config == result["targets"][1]["config"]
    direct = stages.prune(compress.load(tmp_path / "teacher.pt"), PruneSettings(), config=net.card.config,
                          data="synthetic:128").model
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(net(x), direct(x), atol=1e-5)
    assert torch.load(tmp_path / "cut.pt", weights_only=True)["provenance"]["weights"] == "teacher"

    compress.save_checkpoint(tmp_path / "other.pt", compress.build("mobilenet_v2_cifar", num_classes=10, input_size=16))
    wrong = run_cli("extract", run, "--search", tmp_path / "g", "--target", "45%", "--teacher", tmp_path / "other.pt",
                    "-o", tmp_path / "wrong.pt")
    assert wrong.returncode == 2 and "unpruned model the supernet" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (tmp_path / "wrong.pt").exists()


def test_extracted_net_scores_what_the_search_scored(run, tmp_path):
    """The standalone net, BN recalibrated as the search did, has the search's held-out accuracy."""
    entry = _search(run, tmp_path / "e", targets=[Target(macs="60%")])["targets"][0]
    done = stages.extract(run, tmp_path / "n.pt", search_dir=tmp_path / "e")
    net = done.model.eval()
    supernet, record = load_supernet(run / "supernet.pt")
    held = held_out(supernet, record["holdout"], HeldOutScoring(**SCORING))
    hits = sum((net(x).argmax(1) == y).sum().item() for x, y in held.batches("eval"))
    assert hits / len(held.eval) == pytest.approx(entry["top1"]) == pytest.approx(done.heldout_top1)
    provenance = torch.load(tmp_path / "n.pt", weights_only=True)["provenance"]
    assert provenance["heldout_top1_extracted"] == pytest.approx(provenance["heldout_top1"])


def test_a_search_scored_at_a_smaller_input_size_extracts_at_the_models_own(run, tmp_path):
    settings = SearchSettings(method="random", samples=3, score_size=8, **SCORING)
    entry = _search(run, tmp_path / "s", settings, targets=[Target(macs="60%")])["targets"][0]
    supernet, record = load_supernet(run / "supernet.pt")

    def top1(net, held):
        return sum((net(x).argmax(1) == y).sum().item() for x, y in held.batches("eval")) / len(held.eval)

    small = held_out(supernet, record["holdout"], HeldOutScoring(**SCORING, score_size=8))
    assert next(iter(small.batches("eval")))[0].shape[-2:] == (8, 8)
    recalibrate_bn(supernet, entry["config"], small.batches("recal"))
    assert top1(supernet, small) == pytest.approx(entry["top1"])  # the search scored at 8 px

    full = held_out(supernet, record["holdout"], HeldOutScoring(**SCORING))
    recalibrate_bn(supernet, entry["config"], full.batches("recal"))
    want = supernet.extract(entry["config"])  # BN statistics of 16-px images
    done = stages.extract(run, tmp_path / "n.pt", search_dir=tmp_path / "s")
    for a, b in zip(want.buffers(), done.model.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    assert done.heldout_top1 == pytest.approx(top1(done.model.eval(), full))


@pytest.mark.slow
def test_evolution_is_seeded_and_resumes_without_reevaluating(run, tmp_path):
    budgets = [Target(macs="60%"), Target(macs="40%")]
    ra = _search(run, tmp_path / "a", targets=budgets, seed=5)
    rb = _search(run, tmp_path / "b", targets=budgets, seed=5)
    assert _targets(ra) == _targets(rb)
    for t in ra["targets"]:
        assert t["macs"] <= t["budget"]["macs"]
    again = run_cli("search", run, *EVO, "--macs", "60%,40%", "--seed", "5", "--out", tmp_path / "a", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["targets"] == _result(tmp_path / "a")["targets"]
    assert _result(tmp_path / "a")["evaluated_now"] == 0
    assert _targets(_result(tmp_path / "a")) == _targets(ra)
    assert _targets(_search(run, tmp_path / "c", targets=budgets, seed=6)) != _targets(ra)


@pytest.mark.slow
def test_killed_search_resumes_to_the_uninterrupted_result(run, tmp_path):
    args = ["search", str(run), *EVO[:-1], "--iterations", "4", "--macs", "55%", "--seed", "1"]
    full = run_cli(*args, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    total = _result(tmp_path / "full")["evaluated"]
    proc = subprocess.Popen([sys.executable, "-m", "compress", *args, "--out", str(tmp_path / "k")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "k" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (state.exists() and len(json.loads(state.read_text())["evaluated"]) >= 8):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    scored = len(json.loads(state.read_text())["evaluated"])
    assert 8 <= scored < total
    resumed = run_cli(*args, "--out", tmp_path / "k")
    assert resumed.returncode == 0, resumed.stderr
    result = _result(tmp_path / "k")
    assert _targets(result) == _targets(_result(tmp_path / "full"))
    assert result["evaluated_now"] == total - scored


@pytest.mark.slow
def test_torchrun_two_processes_find_the_same_configs(run, tmp_path):
    # not --quiet: the time estimate scores a config first, which every rank must do together
    greedy = ["--method", "greedy", "--greedy-step", "0.3", *IMAGES]
    one = run_cli("search", run, *greedy, "--macs", "50%", "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "compress", "search", str(run), *greedy, "--macs", "50%", "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = _result(tmp_path / "one"), _result(tmp_path / "two")
    assert _targets(r1) == _targets(r2)
    assert r1["evaluated"] == r2["evaluated"]


def test_bad_search_input_is_named(run, tmp_path):
    out = run_cli("search", run, "--macs", "1K", *IMAGES)
    assert out.returncode == 2 and "below the smallest config of this space" in out.stderr
    out = run_cli("search", run, *EVO, "--macs", "50%", "--population", "2", "--parents", "3", "--out", tmp_path / "p")
    assert out.returncode == 2 and "larger than the population" in out.stderr
    said = run_cli("search", run, *EVO[:-1], "--macs", "50%", "--out", tmp_path / "s")
    assert said.returncode == 0, said.stderr
    # before it starts, the search says how long it will take: 6 + 2 x (3 + 3) candidates of evolution
    assert "search: about 18 candidates at " in said.stdout and "--method greedy scores about " in said.stdout
    # resumed, every candidate is scored already: no estimate timed on a cached score
    again = run_cli("search", run, *EVO[:-1], "--macs", "50%", "--out", tmp_path / "s")
    assert again.returncode == 0 and "resuming: " in again.stdout and "search: about" not in again.stdout
    out = run_cli("search", run, *EVO[:-5], "--eval-images", "20", "--quiet", "--macs", "50%", "--out", tmp_path / "s")
    assert out.returncode == 2 and "eval_images: 24 -> 20" in out.stderr
    (tmp_path / "s" / "state.json").write_text("{not json")
    out = run_cli("search", run, *EVO, "--macs", "50%", "--out", tmp_path / "s")
    assert out.returncode == 2 and "is corrupt" in out.stderr
    out = run_cli("search", tmp_path, "--macs", "50%")
    assert out.returncode == 2 and "holds no supernet.pt" in out.stderr
    out = run_cli("extract", run, "--search", tmp_path / "s", "--target", "10M", "-o", tmp_path / "x.pt")
    assert out.returncode == 2 and "no target '10M'" in out.stderr


def test_evaluator_caches_and_budgets_screen_before_scoring(run):
    supernet, record = load_supernet(run / "supernet.pt")
    ds = build_dataset("synthetic:40", True, transforms(False, 16, [0.5] * 3, [0.5] * 3), 10, 16)
    evaluator = Evaluator(supernet, HeldOut(ds, 16, 16))
    space = supernet.space
    config = space.uniform(0.5)
    first = evaluator.score(config)
    assert evaluator.score(config) == first and evaluator.fresh == 1
    assert first["macs"] == space.macs(config) and 0 <= first["top1"] <= 1
    budget = Budget(macs=space.macs(space.uniform(0.5)))
    top = evolution(evaluator, budget, np.random.default_rng(0), population=4, parents=2, mutations=2,
                    crossovers=2, iterations=1)
    assert all(e["macs"] <= budget.macs for e in top)
    assert evaluator.fresh == len(evaluator.cache)  # never the same config twice
    with pytest.raises(CompressError, match="give one value"):
        parse_budgets(space, macs="60%,50%", params="1M,2M,3M")


def test_pareto_front_keeps_only_undominated_points():
    pts = [{"macs": m, "top1": a, "config": i} for i, (m, a) in enumerate([(10, .5), (20, .4), (30, .7), (25, .7), (5, .1)])]
    assert [p["config"] for p in pareto_front(pts)] == [4, 0, 3]


@pytest.mark.slow  # builds a latency model: exports and times whole nets
def test_latency_budget_screens_with_the_table_and_times_the_finalists(run, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    clock = LutSettings(runtime="onnxruntime", samples=6, runs=5)
    # no table given: this machine's cached latency model of the space, built once, a copy kept with the results
    first = _search(run, tmp_path / "s", targets=[Target(latency="80%")], clock=clock)
    cached, lut = list((tmp_path / "cache").rglob("*.json")), tmp_path / "s" / "latency_model.json"
    assert len(cached) == 1 and json.loads(lut.read_text()) == json.loads(cached[0].read_text())
    record = json.loads(lut.read_text())
    budget = 0.8 * record["unpruned_ms"]
    out = run_cli("search", run, *EVO, "--latency", "80%", "--lut", lut, "--out", tmp_path / "c")
    assert out.returncode == 0, out.stderr
    for t in (first["targets"][0], _result(tmp_path / "c")["targets"][0]):
        assert t["budget"]["latency_ms"] == pytest.approx(budget)  # a share of the measured unpruned time
        assert t["latency_ms"] <= budget and t["measured_ms"] > 0 and "onnxruntime" in t["measured_on"]
    rows = (tmp_path / "c" / "search.csv").read_text().splitlines()[1:]
    assert all(r.split(",")[2] for r in rows)  # every candidate has a predicted latency
    # pruning the unpruned model to a latency (its space as `prune` builds it) reads the same model:
    # none is built (not timed here: a 16-px net's time on a busy test machine is mostly noise)
    supernet, _ = load_supernet(run / "supernet.pt")
    unpruned = supernet.plain_copy().eval()
    fitted = cached_latency_model(unpruned, space_for(unpruned), clock_of(clock), clock.samples, progress=False)
    assert fitted.from_cache and fitted.record == record
    assert list((tmp_path / "cache").rglob("*.json")) == cached
    # greedy under a latency budget steps by predicted time, as the budget is counted: each step
    # takes `step` of the time off (or lands on the budget), whatever it takes off the MACs, or
    # narrows every group it can (at 16 px the runtime's fixed cost leaves little to take)
    ds = build_dataset("synthetic:40", True, transforms(False, 16, [0.5] * 3, [0.5] * 3), 10, 16)
    evaluator = Evaluator(supernet, HeldOut(ds, 16, 16), latency=LatencyModel.load(lut, supernet.space).predict)
    limit = Budget(latency_ms=0.6 * evaluator.cost(supernet.space.max())["latency_ms"])
    found, path = greedy(evaluator, [limit], step=0.2)
    assert found[limit] is path[-1] and path[-1]["latency_ms"] <= limit.latency_ms < path[-2]["latency_ms"]
    for before, after in zip(path, path[1:]):
        every = all(after["config"][g.name] < before["config"][g.name] for g in supernet.space.groups
                    if before["config"][g.name] > g.min)
        assert after["latency_ms"] <= max(0.8 * before["latency_ms"], limit.latency_ms) or every


@pytest.mark.slow  # trains a 64-px supernet, builds a latency model and times every pick
def test_a_latency_pick_measured_over_the_budget_is_searched_again_until_it_measures_under(tmp_path, monkeypatch):
    """A latency model that predicts the unpruned model 40% fast (the real one predicted a searched
    224-px MobileNetV2 16% fast): the first pick measures over the budget, and the search
    corrects its target from the measurement, as `prune --latency` does."""
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    done = run_cli("supernet", "mobilenet_v3_small_cifar", "--input-size", "64", "--data", "synthetic:64",
                   "--holdout", "48", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "2", "--workers", "0",
                   "--val-images", "16", *IMAGES, "--quiet", "--out", run)
    assert done.returncode == 0, done.stderr
    model = latency_table(*lut_model_space(run), LutSettings(runtime="onnxruntime", samples=6, runs=10),
                          tmp_path / "true.json", progress=False)
    record, fit = model.record, model.record["fit"]
    fast = 0.6 * record["unpruned_ms"] / model.predict(model.space.max())  # scaled to 60% of its own measured time
    fit.update(weights={k: fast * w for k, w in fit["weights"].items()}, overhead_ms=fast * fit["overhead_ms"])
    (tmp_path / "fast.json").write_text(json.dumps(record))

    # few images a trial: the greedy scores over a hundred trials at 64 px, and only the latency is checked here
    greedy = SearchSettings(method="greedy", greedy_step=0.2, targets=[Target(latency="50%")], recal_images=8,
                            eval_images=8)
    searched = stages.search(run, greedy, out=tmp_path / "b", lut=tmp_path / "fast.json", quiet=True)
    t = searched.result["targets"][0]
    attempts, limit = t["latency_attempts"], t["measured_budget_ms"]
    assert t["budget"]["latency_ms"] == pytest.approx(0.5 * record["unpruned_ms"])  # as the model predicts
    assert attempts[0]["target_ms"] == pytest.approx(limit)  # the same share of the unpruned file timed now
    assert attempts[0]["measured_ms"] > limit  # the model's pick, 40% fast
    assert len(attempts) >= 2 and attempts[1]["target_ms"] < attempts[0]["target_ms"]
    assert t["measured_within_budget"] and t["measured_ms"] <= limit
    assert t["measured_ms"] == max(a["measured_ms"] for a in attempts if a["measured_ms"] <= limit)
    scored = searched.evaluator.score(t["config"])
    assert t["macs"] == scored["macs"] == searched.evaluator.space.macs(t["config"]) and t["top1"] == scored["top1"]
    assert _result(tmp_path / "b") == searched.result


def test_held_out_images_are_a_random_pick_of_a_class_sorted_split():
    # ImageFolder trees and the shared CIFAR-10 arrays are sorted by class: the first images
    # would recalibrate BN on one class and score only that class
    labels = torch.arange(10).repeat_interleave(30)
    ds = torch.utils.data.TensorDataset(torch.randn(300, 3, 8, 8), labels)
    held = HeldOut(ds, 40, 100, seed=3)
    recal, scored = list(held.recal.indices), list(held.eval.indices)
    assert len(recal) == 40 and len(scored) == 100 and not set(recal) & set(scored)
    assert len(set(labels[recal].tolist())) >= 8 and len(set(labels[scored].tolist())) == 10
    assert list(HeldOut(ds, 40, 100, seed=3).recal.indices) == recal  # seeded


def test_greedy_steps_each_remove_a_share_of_the_macs_in_notches_of_a_tenth_of_a_group(run):
    # AutoSlim's gentle trial (a tenth of one group's width), several applied per step: the step
    # count to a budget does not grow with the number of groups
    supernet, _ = load_supernet(run / "supernet.pt")
    ds = build_dataset("synthetic:40", True, transforms(False, 16, [0.5] * 3, [0.5] * 3), 10, 16)
    evaluator = Evaluator(supernet, HeldOut(ds, 16, 16))
    space = supernet.space
    budget = Budget(macs=space.macs(space.max()) // 2)
    messages = []
    found, path = greedy(evaluator, [budget], step=0.15, progress=messages.append)
    assert found[budget] == path[-1] and found[budget]["macs"] <= budget.macs < path[-2]["macs"]
    for a, b in zip(path, path[1:]):
        changed = [k for k in a["config"] if a["config"][k] != b["config"][k]]
        assert changed
        for name in changed:  # one notch each: a tenth of the full width, or down to the smallest
            g = space.by_name[name]
            assert b["config"][name] == max((x for x in g.widths if x <= a["config"][name] - 0.1 * g.max),
                                            default=g.min), name
        goal = max(0.85 * a["macs"], budget.macs)  # a share of the MACs, not past the budget's need
        assert b["macs"] <= goal or len(changed) == sum(a["config"][g.name] > g.min for g in space.groups)
    assert len(path) - 1 <= 5  # 0.85 ** 5 < 0.5
    assert len(messages) == len(path) - 1 and "narrowed" in messages[0]
    assert "more step" in messages[0] and "min) to" in messages[0]
