"""GEO-Bench-2-style aggregation: normalisation, IQM and stratified bootstrap against hand computation, the
leaderboard CSV round trip, and what the report adds (protocol, IQM table, weak-interval flags)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gfm_core.errors import DataValidationError
from gfm_core.evaluation.geobench import (
    COLUMNS,
    LEADERBOARD_COLUMNS,
    LeaderboardRow,
    iqm,
    read_csv,
    stratified_bootstrap_iqm,
    write_csv,
)
from gfm_core.evaluation.report import RunScores, build_report, to_markdown, write_report
from gfm_core.evaluation.results import FinetuneResult, load_result

N = 20  # test samples per run: accuracies are multiples of 5


def _run(task: str, model: str, seed: int, acc: float, **kw) -> RunScores:
    k = round(acc * N / 100)
    correct = np.zeros(N)
    correct[:k] = 1.0
    return RunScores(task, "classification", model, seed, "acc", {"acc": 100 * k / N}, [f"s{i}" for i in range(N)],
                     {"correct": correct}, **kw)


# task -> model -> the two seeds' accuracies; normalised by hand over the 4 runs of the task (min-max):
HAND = {
    "t1": {"a": (10, 20), "b": (30, 50)},  # min 10, max 50: a 0, .25; b .5, 1
    "t2": {"a": (60, 80), "b": (40, 50)},  # min 40, max 80: a .5, 1; b 0, .25
    "t3": {"a": (5, 15), "b": (10, 25)},  # min 5, max 25: a 0, .5; b .25, 1
    "t4": {"a": (20, 40), "b": (60, 100)},  # min 20, max 100: a 0, .25; b .5, 1
}
NORMALISED = {
    "a": {"t1": (0, 0.25), "t2": (0.5, 1), "t3": (0, 0.5), "t4": (0, 0.25)},
    "b": {"t1": (0.5, 1), "t2": (0, 0.25), "t3": (0.25, 1), "t4": (0.5, 1)},
}
# IQM of 8 runs: cut int(0.25 * 8) = 2 from each end, mean of the middle 4
# a sorted: 0 0 0 .25 .25 .5 .5 1 -> (0 + .25 + .25 + .5) / 4 = 0.25
# b sorted: 0 .25 .25 .5 .5 1 1 1 -> (.25 + .5 + .5 + 1) / 4 = 0.5625
IQM_A, IQM_B = 0.25, 0.5625


def _hand_runs(**kw) -> list[RunScores]:
    return [_run(t, m, s, acc, **kw) for t, by_model in HAND.items() for m, accs in by_model.items()
            for s, acc in enumerate(accs)]


def _report(runs, **kw):
    return build_report(runs, baseline="a", reference="b", n_bootstrap=kw.pop("n_bootstrap", 200), **kw)


def test_normalised_scores_and_iqm_match_the_hand_computation():
    report = _report(_hand_runs())
    assert report.norm_ranges == {"t1": (10, 50), "t2": (40, 80), "t3": (5, 25), "t4": (20, 100)}
    got = {(r.backbone, r.dataset, r.seed): r.normalized for r in report.leaderboard}
    assert got == {(m, t, s): NORMALISED[m][t][s] for m in NORMALISED for t in HAND for s in (0, 1)}
    table = {r.model: r for r in report.iqm}
    assert table["a"].iqm == pytest.approx(IQM_A) and table["b"].iqm == pytest.approx(IQM_B)
    assert (table["a"].n_tasks, table["a"].n_seeds, table["a"].missing) == (4, 2, ())
    for row in table.values():
        assert row.lo <= row.iqm <= row.hi
    assert iqm([0, 0.25, 0.5, 1, 0, 0.5, 0, 0.25]) == pytest.approx(IQM_A)
    assert iqm([1, 2, 3, 4, 100]) == pytest.approx(3.0)  # int(1.25) = 1 cut from each end: (2 + 3 + 4) / 3
    assert report.arp["b"] == pytest.approx(  # ARP stays the paper's measure, beside the IQM
        np.mean([100 * (np.mean(HAND[t]["b"]) - np.mean(HAND[t]["a"])) / np.mean(HAND[t]["a"]) for t in HAND]))


def test_identical_seeds_give_a_zero_width_interval():
    lo, hi = stratified_bootstrap_iqm([[0.3, 0.3], [0.7, 0.7, 0.7]], n_bootstrap=100, ci=0.95, seed=3)
    # every replicate is the data itself: 0.3 0.3 0.7 0.7 0.7, cut int(1.25) = 1 each end -> (0.3 + 0.7 + 0.7) / 3
    assert lo == hi == pytest.approx(1.7 / 3)
    # stratified: a replicate redraws within each task, so tasks 0 0 | 1 1 always pool two 0s and two 1s
    assert stratified_bootstrap_iqm([[0, 0], [1, 1]], n_bootstrap=100, ci=0.95, seed=0) == (0.5, 0.5)
    same = [replace(r, metrics={"acc": float(HAND[r.task]["a"][0])}) if r.model == "a" else r for r in _hand_runs()]
    row = next(r for r in _report(same).iqm if r.model == "a")
    assert row.lo == row.hi == pytest.approx(row.iqm)


def test_stratified_bootstrap_equals_an_explicit_resampling_loop():
    per_task = [np.array([0.1, 0.9]), np.array([0.2, 0.4, 0.8]), np.array([0.0, 0.3, 0.6, 1.0])]
    n, ci, seed = 50, 0.9, 7
    rng = np.random.default_rng(seed)
    index = [rng.integers(0, len(x), (n, len(x))) for x in per_task]  # the documented draw order: task by task
    replicates = []
    for b in range(n):
        pooled = np.sort(np.concatenate([x[idx[b]] for x, idx in zip(per_task, index, strict=True)]))
        cut = int(0.25 * len(pooled))  # 9 runs: 2 cut from each end
        replicates.append(pooled[cut:len(pooled) - cut].mean())
    expected = np.quantile(replicates, [0.05, 0.95])
    got = stratified_bootstrap_iqm(per_task, n_bootstrap=n, ci=ci, seed=seed)
    assert got == pytest.approx(tuple(expected), abs=1e-12)
    assert got[1] > got[0]
    assert stratified_bootstrap_iqm(per_task, n_bootstrap=n, ci=ci, seed=seed) == got  # seeded


def test_the_results_csv_round_trips(tmp_path):
    report = _report(_hand_runs(protocol="frozen", scoring="test", label_fraction=0.1))
    rows = [*report.leaderboard,
            replace(report.leaderboard[0], lr=0.1 + 0.2, weight_decay=0.05, batch_size=128, normalized=None,
                    experiment_name="a, quoted \"name\"", decoder=""),
            replace(report.leaderboard[1], test_metric=np.float64(0.5))]  # numpy floats are written as numbers
    path = write_csv(tmp_path / "results_and_parameters.csv", rows)
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    back = read_csv(path)
    assert back == rows
    assert {type(v) for r in back for v in (r.seed, r.data_percentages)} == {int}
    assert back[-2].lr == 0.1 + 0.2 and back[-2].normalized is None and back[-2].early_stop_patience is None
    assert type(back[-1].test_metric) is float and ",0.5," in path.read_text().splitlines()[-1]
    first = back[0]
    assert (first.partition_name, first.data_percentages, first.frozen_or_full_ft, first.protocol) == (
        "0.10x train", 10, "frozen", "frozen")
    assert not list(tmp_path.glob(".*tmp*"))


def test_the_reader_takes_the_leaderboards_own_files_and_names_bad_cells(tmp_path):
    header = ("dataset,Metric,test metric,mlflow_run_name,Seed,experiment_name,index,batch_size,lr,decoder,backbone,"
              "early_stop_patience,n_trials,partition_name,data_percentages,batch_size_selection,weight_decay,"
              "partition name,frozen_or_full_ft")
    line = ("treesatai,Multilabel_F1_Score,0.56619793176651,treesatai_205,205,final_main_x,0,32,0.0003734791062824,"
            "UNet,satlas_x,10.0,16,default,100,HPO,0.01,100%,full_ft")
    (tmp_path / "lb.csv").write_text(header + "\n" + line + "\n")
    (row,) = read_csv(tmp_path / "lb.csv")
    assert row == LeaderboardRow("treesatai", "Multilabel_F1_Score", "final_main_x", "100%", "satlas_x", "UNet",
                                 "HPO", "full_ft", 10, 16, 205, 100, 32, 0.01, 0.0003734791062824, 0.56619793176651)
    (tmp_path / "bad.csv").write_text(header + "\n" + line.replace(",205,", ",2.5,") + "\n")
    with pytest.raises(DataValidationError, match=r"bad\.csv: line 2, column 'Seed': '2\.5' is not an integer"):
        read_csv(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("dataset,Metric\nx,acc\n")
    with pytest.raises(DataValidationError, match=r"missing leaderboard column\(s\) \['experiment_name'"):
        read_csv(tmp_path / "short.csv")
    assert len(LEADERBOARD_COLUMNS) == 16


def test_the_report_states_its_protocol_and_refuses_to_mix_them():
    runs = _hand_runs(protocol="finetune", scoring="test")
    report = _report(runs)
    assert (report.protocol, report.scoring) == ("finetune", "test")
    assert "Protocol: finetune, scoring: test (every fine-tuning result in this report)." in to_markdown(report)
    assert {r.frozen_or_full_ft for r in report.leaderboard} == {"full_ft"}
    mixed = [replace(r, protocol="frozen") if r.model == "b" and r.task == "t2" else r for r in runs]
    with pytest.raises(DataValidationError, match=r"mix finetune\.protocol values \(finetune: 14 run\(s\), e\.g\. "
                                                  r"t1/a/seed_0; frozen: 2 run\(s\).*under one finetune\.protocol"):
        _report(mixed)
    rescored = [replace(r, scoring="paper") if r.seed == 1 else r for r in runs]
    with pytest.raises(DataValidationError, match=r"mix finetune\.scoring values"):
        _report(rescored)


def test_few_seeds_are_flagged_and_five_are_not(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gfm_core.evaluation.report_builder"):
        written = write_report(_report(_hand_runs()), tmp_path / "two")
    md = written.paths["markdown"].read_text()
    assert "| model | IQM | CI low | CI high | n tasks | n seeds |" in md
    assert "| a | 0.250 |" in md and "| b | 0.562 |" in md
    assert "**Weak intervals**: fewer than 5 seeds per task (GEO-Bench-2 asks for 5) for a (2), b (2)" in md
    assert "fewer than 5 seeds per task" in caplog.text
    data = json.loads(written.paths["json"].read_text())
    assert data["iqm"]["a"]["iqm"] == pytest.approx(IQM_A) and data["few_seeds"] == {
        "a": {t: 2 for t in HAND}, "b": {t: 2 for t in HAND}}
    assert read_csv(written.paths["leaderboard_csv"]) == written.leaderboard
    assert written.paths["leaderboard_csv"] == tmp_path / "two" / "results_and_parameters.csv"

    caplog.clear()
    five = [_run(t, m, s, 5 * (s + 1 + (m == "b"))) for t in HAND for m in ("a", "b") for s in range(5)]
    report = _report(five)
    assert report.few_seeds == {} and "Weak intervals" not in to_markdown(report) and not caplog.text
    assert {r.model: r.n_seeds for r in report.iqm} == {"a": 5, "b": 5}


def test_a_model_missing_a_task_gets_no_iqm_and_a_flat_task_is_left_out():
    runs = [r for r in _hand_runs() if not (r.model == "a" and r.task == "t4")]
    row = next(r for r in _report(runs).iqm if r.model == "a")
    assert math.isnan(row.iqm) and row.missing == ("t4",)
    assert "- a: no IQM, no results on t4." in to_markdown(_report(runs))
    flat = [replace(r, metrics={"acc": 50.0}) if r.task == "t4" else r for r in _hand_runs()]
    report = _report(flat)
    assert {r.model: r.n_tasks for r in report.iqm} == {"a": 3, "b": 3}
    assert all(r.normalized is None for r in report.leaderboard if r.dataset == "t4")
    assert "Left out of the IQM, every run scores the same (no range to normalise): t4." in to_markdown(report)


def test_iqm_off_keeps_the_report_as_it_was(tmp_path):
    written = write_report(_report(_hand_runs(), iqm=False), tmp_path)
    assert written.iqm == [] and "leaderboard_csv" not in written.paths
    assert not (tmp_path / "results_and_parameters.csv").exists()
    assert "GEO-Bench-2" not in written.paths["markdown"].read_text()
    assert "iqm" not in json.loads(written.paths["json"].read_text())


def test_finetune_results_carry_protocol_and_scoring_and_old_ones_load(tmp_path):
    res = FinetuneResult("t1", "classification", "gfm", 0, {"acc": 50.0}, "acc", 1, 2, 3, 0.1, "cpu", tmp_path,
                         tmp_path / "result.json", tmp_path / "scores.parquet", protocol="linear", scoring="paper")
    d = res.to_json()
    assert (d["protocol"], d["scoring"]) == ("linear", "paper")
    (tmp_path / "result.json").write_text(json.dumps(d))
    assert load_result(tmp_path) == res
    old = {k: v for k, v in d.items() if k not in ("protocol", "scoring")}  # written before the two fields
    Path(tmp_path / "result.json").write_text(json.dumps(old))
    assert (load_result(tmp_path).protocol, load_result(tmp_path).scoring) == ("finetune", "test")


def test_the_decoder_column_follows_the_configured_decoder():
    from gfm_core.evaluation.geobench import decoder_name

    assert decoder_name("classification", "upernet") == "linear"
    assert decoder_name("segmentation", "upernet") == "UPerNet" and decoder_name("change", "fpn") == "FPN"
    assert decoder_name("superres", "upernet") == "FPN"  # super-resolution keeps its FPN
