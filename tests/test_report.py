"""Report generation from a small MLflow store with known numbers (tests/report_store.py):
known table and statistics, paired differences and ranks, published deltas, cost, per-class
IoU, and the honesty rules: missing seeds, failed / unfinished trials and runs from different
code versions are shown as such, never silently averaged. Plus the CLI's errors."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
from report_store import cached_store

from harness import report
from harness.cli import main

REFS = {"demo": {"alpha": {"val_miou": 70.0, "source": "Paper 2023, Tab. 1"}, "beta": {"val_miou_ss": 60.0}}}
T2, T1 = 4.302653, 12.706205  # t(0.975, df) for df = 2, 1


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return cached_store(tmp_path_factory)


@pytest.fixture(scope="module")
def board(uri):
    return report.build_leaderboard(report.fetch_runs(uri), REFS)


@pytest.fixture(scope="module")
def written(uri, tmp_path_factory):
    out = tmp_path_factory.mktemp("report-out")
    board = report.write_report(uri, out, ["demo"], REFS)
    return out, board


def row(board, label, suite="demo"):
    table = board.table
    match = table[(table["suite"] == suite) & (table["label"] == label)]
    assert len(match) == 1, (label, list(table["label"]))
    return match.iloc[0]


def test_known_numbers_mean_std_ci(board):
    alpha = row(board, "alpha")
    assert alpha["n_seeds"] == 3 and alpha["seeds"] == "0 1 2" and alpha["missing_seeds"] == ""
    assert alpha["val_miou_ss_mean"] == pytest.approx(62.0)  # the superseded run (99) is ignored
    assert alpha["val_miou_ss_std"] == pytest.approx(2.0)
    half = T2 * 2.0 / math.sqrt(3)
    assert alpha["val_miou_ss_ci_low"] == pytest.approx(62.0 - half, abs=1e-4)
    assert alpha["val_miou_ss_ci_high"] == pytest.approx(62.0 + half, abs=1e-4)
    assert alpha["cam_miou_mean"] == pytest.approx(52.0) and alpha["mask_miou_mean"] == pytest.approx(57.0)
    assert alpha["val_miou_ms_crf_mean"] == pytest.approx(66.0) and alpha["val_miou_ms_crf_std"] == pytest.approx(1.0)
    beta = row(board, "beta")
    assert beta["val_miou_ss_mean"] == pytest.approx(154 / 3)
    assert beta["val_miou_ss_std"] == pytest.approx(1.527525, abs=1e-6)
    assert beta["val_miou_ms_crf_n"] == 0 and math.isnan(beta["val_miou_ms_crf_mean"])
    other = row(board, "alpha", suite="other")  # another suite is another row, never mixed in
    assert other["n_seeds"] == 1 and other["val_miou_ss_mean"] == 30.0 and math.isnan(other["val_miou_ss_std"])


def test_missing_seeds_and_failed_trials_are_shown_not_averaged(board):
    gamma = row(board, "gamma")
    assert gamma["n_seeds"] == 2 and gamma["seeds"] == "0 1" and gamma["missing_seeds"] == "2" and gamma["n_failed"] == 1
    assert gamma["val_miou_ss_mean"] == pytest.approx(61.25)
    half = T1 * math.sqrt(0.125) / math.sqrt(2)
    assert gamma["val_miou_ss_ci_high"] == pytest.approx(61.25 + half, abs=1e-4)
    eps = row(board, "eps")  # every trial failed or unfinished: a row with n = 0, no numbers
    assert eps["n_seeds"] == 0 and eps["n_failed"] == 2 and math.isnan(eps["val_miou_ss_mean"])
    failed = board.failed.set_index(["label", "seed"])
    assert failed.loc[("gamma", 2), "status"] == "failed"
    assert "out of memory" in failed.loc[("gamma", 2), "error"]
    assert failed.loc[("eps", 0), "status"] == "running"
    assert failed.loc[("eps", 1), "status"].startswith("unfinished")  # tagged finished, run never terminated
    text = " ".join(board.warnings)
    assert "gamma** has n=2" in text and "missing seed(s) 2" in text
    assert "eps** has no finished trial" in text


def test_code_versions_are_separate_rows(board):
    aaa, bbb = row(board, "delta @aaa"), row(board, "delta @bbb")
    assert (aaa["code_version"], bbb["code_version"]) == ("aaa", "bbb")
    assert aaa["code_flag"] == bbb["code_flag"] == "mixed"
    assert aaa["val_miou_ss_mean"] == 45.0 and aaa["n_seeds"] == 1 and aaa["missing_seeds"] == "1 2"
    assert bbb["val_miou_ss_mean"] == pytest.approx(41.5) and bbb["seeds"] == "1 2"
    assert not (board.table["val_miou_ss_mean"].round(4) == round(128 / 3, 4)).any()  # never the mixed mean
    assert any("2 code versions" in w and "never averaged" in w for w in board.warnings)


def test_pairwise_over_matched_seeds(board):
    pw = board.pairwise[board.pairwise["metric"] == "val_miou_ss"].set_index(["a", "b"])
    ab = pw.loc[("alpha", "beta")]
    assert ab["n_matched"] == 3 and ab["seeds"] == "0 1 2"
    assert ab["mean_diff"] == pytest.approx(32 / 3)
    assert ab["std_diff"] == pytest.approx(math.sqrt(1 / 3))
    assert ab["ci_low"] == pytest.approx(32 / 3 - T2 * math.sqrt(1 / 3) / math.sqrt(3), abs=1e-4)
    assert ab["p_value"] == pytest.approx(0.000975, abs=2e-6)
    assert ab["distinguishable"] is True and ab["verdict"] == "alpha better"
    ag = pw.loc[("alpha", "gamma")]  # gamma's failed seed 2 is not matched
    assert ag["n_matched"] == 2 and ag["mean_diff"] == pytest.approx(-0.25) and ag["distinguishable"] is False
    assert ag["verdict"] == "within seed noise"
    one = pw.loc[("delta @aaa", "gamma")]
    assert one["n_matched"] == 1 and one["distinguishable"] is None and "needs >= 2" in one["verdict"]
    assert pw.loc[("delta @aaa", "delta @bbb"), "n_matched"] == 0
    assert ("alpha", "eps") not in pw.index  # eps has no values: nothing to compare


def test_ranks_tie_where_not_distinguishable(board):
    ranks = {r["label"]: r["rank_val_miou_ss"] for _, r in board.table[board.table["suite"] == "demo"].iterrows()}
    assert ranks["alpha"] == 1 and ranks["gamma"] == 1  # 62.0 vs 61.25: within seed noise -> tied
    assert ranks["beta"] == 3 and ranks["delta @bbb"] == 3  # two rows are distinguishably better
    assert math.isnan(ranks["delta @aaa"]) and math.isnan(ranks["eps"])  # n < 2: no rank claimed
    assert report.primary_metric(board.table[board.table["suite"] == "demo"]) == "val_miou_ss"


def test_published_numbers_and_delta(board):
    alpha, beta = row(board, "alpha"), row(board, "beta")
    assert alpha["reference_val_miou_ms_crf"] == 70.0  # `val_miou` means the paper's MS + CRF number
    assert alpha["delta_val_miou_ms_crf"] == pytest.approx(-4.0)
    assert alpha["reference_source"] == "Paper 2023, Tab. 1"
    assert beta["reference_val_miou_ss"] == 60.0 and beta["delta_val_miou_ss"] == pytest.approx(154 / 3 - 60)
    assert math.isnan(row(board, "gamma")["reference_val_miou_ss"])


def test_delta_only_where_the_published_protocol_matches(uri):
    # alpha's runs record method.epochs = "2" and no splits (tests/report_store.py).
    refs = {"demo": {"alpha": {
        "source": "Paper",
        "val_miou_ss": {"value": 60.0, "source": "Tab. 9", "config": {"epochs": 2}},   # matches -> delta
        "cam_miou": {"value": 50.0, "config": {"epochs": 3}},                        # recipe differs
        "val_miou": {"value": 70.0, "split": "val"},                                 # split not recorded
    }}}
    board = report.build_leaderboard(report.fetch_runs(uri), refs)
    alpha = row(board, "alpha")
    assert alpha["delta_val_miou_ss"] == pytest.approx(62.0 - 60.0) and alpha["reference_note_val_miou_ss"] == ""
    assert alpha["reference_cam_miou"] == 50.0 and math.isnan(alpha["delta_cam_miou"])
    assert alpha["reference_note_cam_miou"] == "not comparable: published with alpha.epochs = 3, ours 2"
    assert math.isnan(alpha["delta_val_miou_ms_crf"])
    assert "do not record their val split" in alpha["reference_note_val_miou_ms_crf"]
    assert alpha["reference_source"] == "Paper; val SS Tab. 9"
    text = report.to_markdown(board, {}, {})
    assert "60.0 / 62.0 / +2.0" in text
    assert "50.0 / 52.0 / not comparable: published with alpha.epochs = 3, ours 2" in text


def test_oracle_threshold_warning_uses_the_range_actually_swept():
    base = {"suite": "s", "dataset": "d", "method": "m", "seed": 0, "status": "finished", "run_id": "r",
            "config": '{"eval.threshold_stop": "0.6"}', "cam_best_threshold": 0.6}
    # The sweep widened to 0.70 and its best 0.60 lies inside: no warning. Old runs (no
    # cam_threshold_stop) and a best at the widened end (1.0) are flagged.
    widened = pd.DataFrame([{**base, "cam_threshold_stop": 0.7}])
    assert report._oracle_threshold_at_sweep_end(widened) == []
    assert report._oracle_threshold_at_sweep_end(pd.DataFrame([base])) == [0]
    at_end = pd.DataFrame([{**base, "cam_best_threshold": 1.0, "cam_threshold_stop": 1.0}])
    assert report._oracle_threshold_at_sweep_end(at_end) == [0]


def test_oracle_epoch_choice_is_read_from_the_runs_metrics():
    # Two finished seeds of one row; the runs logged cam_selected_epoch (an oracle checkpoint).
    runs = pd.DataFrame([{"suite": "s", "dataset": "d", "method": "weaktr", "seed": seed, "status": "finished",
                          "run_id": f"r{seed}", "config": "{}", "cam_miou": 60.0 + seed, "cam_selected_epoch": 5.0}
                         for seed in (0, 1)])
    refs = {"s": {"weaktr": {"cam_miou": {"value": 66.2, "best_epoch": True}}}}
    oracle = report.build_leaderboard(runs, refs).table.iloc[0]
    assert oracle["delta_cam_miou"] == pytest.approx(60.5 - 66.2) and oracle["reference_note_cam_miou"] == ""
    last = report.build_leaderboard(runs.drop(columns="cam_selected_epoch"), refs).table.iloc[0]
    assert math.isnan(last["delta_cam_miou"]) and "oracle" in last["reference_note_cam_miou"]

def test_cost_columns(board):
    alpha = row(board, "alpha")
    assert alpha["time_train_cam_s_mean"] == pytest.approx(101.0) and alpha["time_train_cam_s_std"] == pytest.approx(1.0)
    assert alpha["device_h_train_cam"] == pytest.approx(180 / 3600)  # CPU run: CPU core-hours
    assert alpha["device_h_total"] == pytest.approx((180 + 15 + 30 + 360 + 40) / 3600)
    assert alpha["train_wall_h"] == pytest.approx((101 + 20 + 200) / 3600)
    assert alpha["device_kind"] == "cpu" and alpha["hardware"] == "cpu x86_64 x2"
    assert alpha["peak_rss_mb"] == 1500.0 and math.isnan(alpha["peak_gpu_mb"])
    assert alpha["params_total"] == 2e6 and alpha["gmacs_total"] == 1.5
    assert alpha["networks"] == "classifier=1.00M/0.50G segmenter=1.00M/1.00G"


def test_per_class_table(board):
    pc = board.per_class
    alpha = pc[(pc["label"] == "alpha") & (pc["what"] == "val_ss")]
    assert list(alpha["class"]) == ["background", "disc", "square"]
    disc = alpha[alpha["class"] == "disc"].iloc[0]
    assert (disc["n"], disc["mean"], disc["std"]) == (3, 63.0, 2.0)
    assert set(pc["what"]) == {"val_ss", "mask"}


def test_duplicates_and_dirty_code_are_flagged():
    base = {"suite": "s", "dataset": "d", "method": "m", "status": "finished", "hardware": "cpu", "config": "{}", "error": ""}
    runs = pd.DataFrame([
        {**base, "seed": 0, "run_id": "r1", "code_version": "abc-dirty", "end_time": 1, "val_miou_ss": 10.0},
        {**base, "seed": 0, "run_id": "r2", "code_version": "abc-dirty", "end_time": 2, "val_miou_ss": 20.0},
        {**base, "seed": 1, "run_id": "r3", "code_version": "abc-dirty", "end_time": 3, "val_miou_ss": 30.0},
    ])
    board = report.build_leaderboard(runs)
    r = board.table.iloc[0]
    assert r["n_seeds"] == 2 and r["val_miou_ss_mean"] == 25.0  # newest of the two seed-0 runs
    assert r["code_flag"] == "dirty"
    assert any("more than one finished run" in w and "r1" in w for w in board.warnings)
    assert any("uncommitted changes" in w for w in board.warnings)


def test_clean_and_dirty_runs_of_one_tree_get_distinct_labels(tmp_path):
    """Editing the code between trials gives runs tagged ``<tree>`` and ``<tree>-dirty``: two
    rows with two labels (a shared label once crashed the per-class plot)."""
    base = {"suite": "s", "dataset": "d", "method": "m", "status": "finished", "hardware": "cpu", "config": "{}", "error": ""}
    tree = "609d9bdecc4e"
    runs = pd.DataFrame([
        {**base, "seed": 0, "run_id": "a", "code_version": tree, "val_miou_ss": 10.0, "iou_val_ss/background": 50.0},
        {**base, "seed": 0, "run_id": "b", "code_version": f"{tree}-dirty", "val_miou_ss": 20.0, "iou_val_ss/background": 60.0},
    ])
    board = report.build_leaderboard(runs)
    assert sorted(board.table["label"]) == [f"m @{tree}", f"m @{tree}-dirty"]
    pc = board.per_class[board.per_class["what"] == "val_ss"]
    assert sorted(pc["mean"]) == [50.0, 60.0]
    from harness.report.plots import per_class_plot

    assert per_class_plot(pc, list(board.table["label"]), {}, "val", tmp_path / "pc.png").exists()


def test_variants_of_one_method_are_separate_rows():
    base = {"suite": "s", "dataset": "d", "method": "m", "status": "finished", "hardware": "cpu", "code_version": "c", "error": ""}
    runs = pd.DataFrame([
        {**base, "seed": 0, "run_id": "a", "config": '{"method.epochs": "2"}', "val_miou_ss": 10.0},
        {**base, "seed": 0, "run_id": "b", "config": '{"method.epochs": "5"}', "val_miou_ss": 20.0},
    ])
    labels = sorted(report.build_leaderboard(runs).table["label"])
    assert labels == ["m [epochs=2]", "m [epochs=5]"]


def test_written_files(written):
    out, board = written
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html", "pairwise.csv", "per_class.csv", "runs.csv"):
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "leaderboard.csv")
    assert list(table.columns) == report.leaderboard_columns()
    assert set(table["suite"]) == {"demo"}  # --suite demo
    alpha = table[table["label"] == "alpha"].iloc[0]
    assert alpha["val_miou_ss_mean"] == pytest.approx(62.0) and alpha["n_seeds"] == 3
    pairwise = pd.read_csv(out / "pairwise.csv")
    assert list(pairwise.columns) == report.PAIRWISE_COLUMNS
    assert list(pd.read_csv(out / "per_class.csv").columns) == report.PER_CLASS_COLUMNS
    runs = pd.read_csv(out / "runs.csv")
    assert set(runs["status"]) == {"finished", "failed", "running", "unfinished (run running)"}
    assert len(runs) == 14  # 11 finished + 3 failed / unfinished; the superseded run is not there
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == ["demo-synthetic-cam-curve.png", "demo-synthetic-pareto.png", "demo-synthetic-per-class-mask.png",
                     "demo-synthetic-per-class-val_ss.png"]
    gallery = sorted(p.relative_to(out / "gallery").as_posix() for p in (out / "gallery").rglob("*.png"))
    for label in ("alpha", "beta", "gamma", "delta_aaa", "delta_bbb"):
        for kind in ("image", "gt", "cam", "mask", "pred"):
            assert f"demo/synthetic/{label}/img_000_{kind}.png" in gallery
    md = (out / "leaderboard.md").read_text()
    for text in ("**Protocol.**", "oracle", "| 1= | alpha |", "| 1= | gamma |", "never averaged", "missing seed(s) 2",
                 "Failed or unfinished trials (not averaged)", "out of memory", "Paper 2023, Tab. 1", "70.0 / 66.0 / -4.0",
                 "62.0 ± 2.0 [57.0, 67.0]", "45.0 (n=1)", "[+9.23, +12.10]", "within seed noise",
                 "![demo/synthetic: CAM mIoU vs background threshold](plots/demo-synthetic-cam-curve.png)",
                 "(gallery/demo/synthetic/alpha/img_000_cam.png)", "delta @aaa †"):
        assert text in md, text


def test_html_is_self_contained(written):
    out, _ = written
    html = (out / "leaderboard.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", html)  # every resource is embedded
    assert html.count('src="data:image/png;base64,') == 4 + 5 * 2 * 5  # plots + 5 rows x 2 images x 5 kinds
    assert "never averaged" in html and "<strong>delta</strong>" in html


def test_cli_report(uri, tmp_path, capsys):
    out = tmp_path / "rep"
    code = main(["report", "--tracking-uri", uri, "--results", str(tmp_path), "--out", str(out), "--suite", "demo", "--no-gallery"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "alpha" in text and "3/3" in text and "failed or unfinished" in text
    assert (out / "leaderboard.html").is_file() and not (out / "gallery").exists()


def test_cli_filter_and_experiment(uri, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", "--tracking-uri", uri, "--results", str(tmp_path), "--out", str(out), "--no-gallery", "--no-plots",
                 "--filter", "tags.`wsss.method` = 'beta'"]) == 0
    assert list(pd.read_csv(out / "leaderboard.csv")["label"]) == ["beta"]
    # The filter's own backticks need a longer code fence (markdown) and stay inside one <code>.
    assert "filter `` tags.`wsss.method` = 'beta' ``;" in (out / "leaderboard.md").read_text()
    assert "filter <code>tags.`wsss.method` = 'beta'</code>;" in (out / "leaderboard.html").read_text()
    assert main(["report", "--tracking-uri", uri, "--results", str(tmp_path), "--out", str(out), "--no-gallery", "--no-plots",
                 "--experiment", "wsss-bench/other"]) == 0
    assert list(pd.read_csv(out / "leaderboard.csv")["suite"]) == ["other"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--suite", "dmeo"], 'Unknown suite "dmeo". Did you mean "demo"? Valid suites: demo, other.'),
        (["--experiment", "nope"], 'Unknown experiment "nope"'),
        (["--filter", "tags.`wsss.method` = 'nothing'"], "No wsss-bench trial runs in"),
        (["--experiment", "unrelated-experiment"], "No wsss-bench trial runs in"),
        (["--filter", "this is not a filter"], "MLflow rejected the filter"),
    ],
)
def test_cli_report_errors(uri, tmp_path, capsys, extra, message):
    code = main(["report", "--tracking-uri", uri, "--results", str(tmp_path), "--out", str(tmp_path / "o"), *extra])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2, out
    assert message in out
    assert "Traceback" not in out


def test_cli_report_without_a_store(tmp_path, capsys):
    code = main(["report", "--results", str(tmp_path / "fresh")])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2 and "No MLflow store at" in out and "wsss-bench run" in out
    assert not (tmp_path / "fresh" / "mlflow.db").exists()  # nothing created by looking


def test_empty_leaderboard_renders():
    board = report.build_leaderboard(pd.DataFrame())
    assert board.empty
    assert "No trial runs matched" in report.to_markdown(board)
    from harness.report.html import render_html

    assert "No trial runs matched" in render_html(board)


def test_gpu_runs_count_gpu_hours():
    base = {"suite": "s", "dataset": "d", "method": "m", "status": "finished", "code_version": "c", "config": "{}", "error": ""}
    runs = pd.DataFrame([
        {**base, "seed": s, "run_id": f"r{s}", "hardware": "NVIDIA H100 80GB HBM3", "time_train_cam_s": 3600.0, "cpu_train_cam_s": 900.0,
         "peak_gpu_train_cam_mb": 1000.0 * (s + 1), "time_total_s": 3600.0}
        for s in (0, 1)
    ])
    r = report.build_leaderboard(runs).table.iloc[0]
    assert r["device_kind"] == "gpu" and r["device_h_train_cam"] == 1.0  # wall hours on the GPU, not CPU time
    assert r["peak_gpu_mb"] == 2000.0 and r["hardware"] == "NVIDIA H100 80GB HBM3"


def test_every_csv_column_is_documented():
    doc = report.__doc__
    names = sorted(set(report.QUALITY_METRICS) | set(report.COST_STAGES), key=len, reverse=True)
    for column in report.leaderboard_columns():
        if f"``{column}" in doc or f", {column}" in doc or f"{column}``" in doc:
            continue
        pattern = column
        for name in names:
            placeholder = "<s>" if name in report.COST_STAGES else "<m>"
            replaced = re.sub(rf"(?<![a-z]){name}(?![a-z])", placeholder, pattern, count=1)
            if replaced != pattern:
                pattern = replaced
                break
        assert pattern in doc, f"leaderboard.csv column {column} ({pattern}) is not documented in harness/report.py"
    for column in report.PAIRWISE_COLUMNS + report.PER_CLASS_COLUMNS + report.RUN_COLUMNS:
        assert column in doc, column


def test_runs_group_by_code_tree_not_by_commit(tmp_path):
    """A commit that touches only tests or docs keeps ``wsss.code_tree``: its runs average with
    the earlier ones; a different tree is a separate row."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("wsss-bench/tree", artifact_location=(tmp_path / "art").as_uri())
    runs = ((0, "c1", "t1", 40.0, "true"), (1, "c2", "t1", 44.0, "true"), (2, "c3", "t2", 10.0, "true"), (0, "c3", "t2", 5.0, "false"))
    for seed, commit, tree, value, aaf in runs:
        tags = {"wsss.trial_id": f"z{seed}{aaf}", "wsss.method": "zeta", "wsss.dataset": "synthetic", "wsss.suite": "tree",
                "wsss.seed": str(seed), "wsss.status": "finished", "wsss.git_commit": commit, "wsss.code_tree": tree}
        rid = client.create_run(exp, tags=tags).info.run_id
        client.log_param(rid, "method.aaf", aaf)
        client.log_param(rid, "eval.threshold_stop", "0.6")
        client.log_metric(rid, "val_miou_ss", value)
        client.log_metric(rid, "cam_best_threshold", 0.6 if aaf == "false" else 0.35)
        client.set_terminated(rid)
    board = report.build_leaderboard(report.fetch_runs(uri), {})
    t1, t2 = row(board, "zeta [aaf=true] @t1", suite="tree"), row(board, "zeta [aaf=true] @t2", suite="tree")
    assert t1["n_seeds"] == 2 and t1["val_miou_ss_mean"] == pytest.approx(42.0) and t1["code_version"] == "t1"
    assert t2["n_seeds"] == 1 and t2["val_miou_ss_mean"] == pytest.approx(10.0)
    # the terminal table shows variants as text (rich would swallow "[aaf=false]" as markup)
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(report.leaderboard_table(board))
    assert "zeta [aaf=false]" in console.export_text()
    # an oracle threshold at the end of the sweep is flagged: the optimum may lie past it
    edge = [w for w in board.warnings if "upper end" in w]
    assert len(edge) == 1 and "zeta [aaf=false]" in edge[0] and "seed(s) 0;" in edge[0]


def test_oracle_threshold_of_one_is_named_all_background_not_past_the_range(tmp_path):
    """A sweep widened to 1.0 whose best threshold is 1.0 has no range left to raise: the
    warning says the CAMs do no better than all background; a best threshold of 0 is named too."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("wsss-bench/edge", artifact_location=(tmp_path / "art").as_uri())
    for seed, best, stop in ((0, 1.0, 1.0), (1, 0.7, 0.7), (2, 0.0, 0.6)):
        tags = {"wsss.trial_id": f"t{seed}", "wsss.method": "zeta", "wsss.dataset": "synthetic", "wsss.suite": "edge",
                "wsss.seed": str(seed), "wsss.status": "finished", "wsss.code_tree": "t1"}
        rid = client.create_run(exp, tags=tags).info.run_id
        client.log_metric(rid, "val_miou_ss", 10.0)
        client.log_metric(rid, "cam_best_threshold", best)
        client.log_metric(rid, "cam_threshold_stop", stop)
        client.set_terminated(rid)
    warnings = report.build_leaderboard(report.fetch_runs(uri), {}).warnings
    assert [w for w in warnings if "upper end" in w and "seed(s) 1;" in w]
    assert [w for w in warnings if "is 1.00 for seed(s) 0:" in w and "all-background" in w]
    # ... and one at 0: every pixel its image's class, which measures the image labels
    assert [w for w in warnings if "is 0.00 for seed(s) 2:" in w and "image label everywhere" in w]


def test_runs_on_different_library_versions_are_separate_rows_naming_them(tmp_path):
    """Same code tree and seeds, two torch versions (tag ``wsss.env``): two rows, never one mean,
    each naming its versions (a newer torch changes the numbers; issue 17 item 13)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("wsss-bench/envs", artifact_location=(tmp_path / "art").as_uri())
    old = {"wsss.lib.torch": "2.4.0", "wsss.lib.numpy": "1.26.4", "wsss.lib.mlflow": "3.0.0", "wsss.env": "aaaaaaaaaaaa"}
    new = {"wsss.lib.torch": "2.14.1+cu130", "wsss.lib.numpy": "1.26.4", "wsss.lib.mlflow": "3.17.2", "wsss.env": "bbbbbbbbbbbb"}
    for seed, libs, value in ((0, old, 20.0), (1, old, 22.0), (0, new, 18.0), (1, new, 19.0)):
        tags = {"wsss.trial_id": f"e{seed}", "wsss.method": "afa", "wsss.dataset": "synthetic", "wsss.suite": "envs",
                "wsss.seed": str(seed), "wsss.status": "finished", "wsss.code_tree": "t1", **libs}
        rid = client.create_run(exp, tags=tags).info.run_id
        client.log_metric(rid, "mask_miou", value)
        client.set_terminated(rid)
    board = report.build_leaderboard(report.fetch_runs(uri), {})
    a, b = row(board, "afa env:aaaaaaaa", suite="envs"), row(board, "afa env:bbbbbbbb", suite="envs")
    # means of each environment's seeds: (20 + 22) / 2 and (18 + 19) / 2; never (20 + 22 + 18 + 19) / 4 = 19.75
    assert (a["n_seeds"], a["mask_miou_mean"], b["n_seeds"], b["mask_miou_mean"]) == (2, 21.0, 2, 18.5)
    assert (a["env"], a["versions"]) == ("aaaaaaaaaaaa", "torch 2.4.0, numpy 1.26.4")  # mlflow: bookkeeping, not shown
    assert b["versions"] == "torch 2.14.1+cu130, numpy 1.26.4"
    assert any("2 sets of library versions" in w for w in board.warnings)
    assert not any("more than one finished run" in w for w in board.warnings)  # seed 0 twice, but in two rows
    md = report.to_markdown(board)
    assert "- afa env:aaaaaaaa: torch 2.4.0, numpy 1.26.4 (env `aaaaaaaaaaaa`)" in md
    assert "- afa env:bbbbbbbb: torch 2.14.1+cu130, numpy 1.26.4 (env `bbbbbbbbbbbb`)" in md


def test_irn_rows_say_plus_irn_even_without_a_variant(tmp_path):
    """eval.refine=irn changes what the mask column measures: the row says "+IRN" whether or
    not the method has other configurations in the report."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("wsss-bench/irn", artifact_location=(tmp_path / "art").as_uri())
    for method, refine in (("zeta", "irn"), ("eta", "irn"), ("eta", "none")):
        tags = {"wsss.trial_id": f"{method}-{refine}", "wsss.method": method, "wsss.dataset": "synthetic", "wsss.suite": "irn",
                "wsss.seed": "0", "wsss.status": "finished", "wsss.code_tree": "t1"}
        rid = client.create_run(exp, tags=tags).info.run_id
        client.log_param(rid, "eval.refine", refine)
        client.log_metric(rid, "mask_miou", 10.0)
        client.set_terminated(rid)
    board = report.build_leaderboard(report.fetch_runs(uri), {})
    assert sorted(board.table["label"]) == ["eta [refine=irn] +IRN", "eta [refine=none]", "zeta +IRN"]
    assert sorted(board.table["tag"]) == ["eta·v1 +IRN", "eta·v2", "zeta +IRN"]


def test_the_variant_run_with_the_suites_recipe_is_marked_in_the_legend(tmp_path):
    """Two configurations of one method: the legend says which one is the suite's own recipe
    (the params a plain `run --suite` records, harness.sweep.recipe_params)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from harness.config import Suite
    from harness.sweep import recipe_params

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("wsss-bench/rec", artifact_location=(tmp_path / "art").as_uri())
    suite = Suite(name="rec", dataset="synthetic", method_params={"cam": {"epochs": 2}})
    recipe = recipe_params(suite, "cam")
    assert recipe["method.epochs"] == "2" and recipe["eval.refine"] == "none"
    for epochs in ("2", "5"):
        tags = {"wsss.trial_id": f"cam-{epochs}", "wsss.method": "cam", "wsss.dataset": "synthetic", "wsss.suite": "rec",
                "wsss.seed": "0", "wsss.status": "finished", "wsss.code_tree": "t1"}
        rid = client.create_run(exp, tags=tags).info.run_id
        client.log_batch(rid, params=[Param(k, v) for k, v in {**recipe, "method.epochs": epochs}.items()])
        client.log_metric(rid, "mask_miou", 10.0)
        client.set_terminated(rid)
    board = report.build_leaderboard(report.fetch_runs(uri), {}, recipes={("rec", "cam"): recipe})
    assert board.legends[("rec", "synthetic")] == [("cam·v1", "epochs=2 (the suite's recipe)"), ("cam·v2", "epochs=5")]
    plain = report.build_leaderboard(report.fetch_runs(uri), {})
    assert plain.legends[("rec", "synthetic")] == [("cam·v1", "epochs=2"), ("cam·v2", "epochs=5")]


def test_settings_every_row_shares_off_the_suites_recipe_are_stated(tmp_path):
    """A report of runs that all load pretrained=synthetic (one row per method, so the variant
    legend is empty) still says so: the departure from the suite's recipe is listed once per
    method, and not for a method whose runs follow the recipe."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from harness.config import Suite
    from harness.report.document import report_blocks
    from harness.sweep import recipe_params

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("wsss-bench/dep", artifact_location=(tmp_path / "art").as_uri())
    suite = Suite(name="dep", dataset="synthetic", method_params={"cam": {"epochs": 2}})
    recipe = recipe_params(suite, "cam")
    for seed, pretrained in (("0", "synthetic"), ("1", "synthetic")):
        tags = {"wsss.trial_id": f"cam-{seed}", "wsss.method": "cam", "wsss.dataset": "synthetic", "wsss.suite": "dep",
                "wsss.seed": seed, "wsss.status": "finished", "wsss.code_tree": "t1"}
        rid = client.create_run(exp, tags=tags).info.run_id
        client.log_batch(rid, params=[Param(k, v) for k, v in {**recipe, "method.pretrained": pretrained}.items()])
        client.log_metric(rid, "mask_miou", 10.0)
        client.set_terminated(rid)
    runs = report.fetch_runs(uri)
    board = report.build_leaderboard(runs, {}, recipes={("dep", "cam"): recipe})
    assert board.legends.get(("dep", "synthetic"), []) == []
    assert board.departures[("dep", "synthetic")] == [("cam", "pretrained=synthetic")]
    text = " ".join(str(b[1]) for b in report_blocks(board) if b[0] == "p")
    assert "**Not the suite's recipe**: every row of a method shares these settings, which differ from the suite's: " \
           "cam `pretrained=synthetic`." in text
    same = report.build_leaderboard(runs, {}, recipes={("dep", "cam"): {**recipe, "method.pretrained": "synthetic"}})
    assert same.departures == {}
