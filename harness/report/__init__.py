"""Leaderboards from MLflow: the comparison a WSSS reviewer can trust.

The package's imports run one way (tests/test_import_graph.py checks there is no circle)::

    store        MLflow -> one tidy runs frame (its columns: harness/report/store.py)
      -> leaderboard   rows over seeds, statistics, ranks, published references
        -> document    the format-independent report (blocks) and cell formatting
        -> renderers   markdown, html (Jinja2 template in templates/), plots, gallery,
                       csv, terminal: none imports another
    writer       write_report: the one place that calls them all, in that order

This module is the face: it re-exports the entry points other modules use.

``write_report`` reads every trial run of the selected experiments from the tracking store
(the store alone is enough: metrics, tags, params, metric histories and gallery artifacts)
and writes into the output directory::

    leaderboard.md     tables, warnings and the protocol, with links to plots/ and gallery/
    leaderboard.html   the same, self-contained (styles and images embedded; opens offline)
    leaderboard.csv    one row per (suite, dataset, method, variant, code version)
    pairwise.csv       paired comparisons between rows over matched seeds
    per_class.csv      per-class IoU over seeds
    runs.csv           every run, one row each, with its status (the raw numbers)
    plots/*.png        mIoU vs training cost (Pareto front), CAM mIoU vs background
                       threshold, per-class IoU bars
    gallery/...        image, ground truth, CAM, pseudo mask, prediction per method

Rules that make the numbers trustworthy (tested in tests/test_report.py):

* Only runs with status ``finished`` (tag *and* MLflow run status) are averaged. Failed,
  interrupted, partial and still-running trials are listed separately; a method whose every
  trial failed still gets a row, with ``n_seeds = 0``.
* Runs from different code versions (tag ``wsss.code_tree``, the hash of ``harness/`` and
  ``methods/``; ``wsss.git_commit`` for older runs) are never averaged together:
  each version is its own row, and ``code_flag`` says ``mixed`` for every row of such a group
  (``dirty`` for runs from a working tree with uncommitted changes, ``unknown`` when the
  commit was not recorded).
* Runs on different result-deciding library versions (tag ``wsss.env``, the hash of the
  ``wsss.lib.*`` versions, harness/environment.py) are never averaged together either: each
  environment is its own row (label suffix ``env:<hash>`` when a method has several), and the
  report names every row's versions.
* Every statistic carries its n. ``missing_seeds`` lists the seeds that other rows of the
  same suite / dataset (or the suite file) have and this row lacks.
* Statistics: :mod:`harness.stats` (sample std, Student-t 95% CI, paired t over matched
  seeds). Ranks share a number where the paired comparison cannot tell rows apart.

leaderboard.csv columns (stable; ``pandas.read_csv``), in this order:

=================================  ===========================================================
``suite, dataset, method``         what was run
``variant``                        the method/dataset/eval params that differ between this
                                   method's configs in the suite ('' if it has one config)
``segmentation``                   ``own`` (the method's segmenter) or ``common`` (the
                                   harness's shared segmentation recipe, harness/common_seg.py)
``code_version``                   the git commit of the runs (one per row)
``code_flag``                      '' | ``mixed`` | ``dirty`` | ``unknown`` (see above)
``label``                          the row's display name
``tag``                            the short name the reports show: ``label`` with its variant
                                   settings replaced by ``·v<k>`` (``weaktr·v2``; the reports'
                                   legend lists each tag's settings)
``random_init``                    True: real data (a data root) and a ``*pretrained`` field
                                   None, i.e. trained without ImageNet weights (label flagged)
``n_seeds, seeds``                 finished seeds averaged, space-separated seed list
``missing_seeds``                  expected seeds without a finished run (space-separated)
``n_failed``                       failed / unfinished trials of this row (not averaged)
``<m>_n, <m>_mean, <m>_std,``      for m in :data:`QUALITY_METRICS`: values present, mean,
``<m>_ci_low, <m>_ci_high``        sample std, 95% t-interval of the mean, clipped to the metric's range (NaN for n < 2)
``rank_<m>``                       for m in :data:`RANK_METRICS`: 1 = best; equal numbers =
                                   not distinguishable over matched seeds
``reference_<m>, delta_<m>,``      for m in :data:`REFERENCE_METRICS`: the suite file's
``reference_note_<m>``             published number, ours minus it (NaN if none, or if the
                                   protocols differ) and '' or "not comparable: <why>"
                                   (harness/references.py decides)
``reference_source``               the suite's citation / note for its published numbers
``time_<s>_s_mean, time_<s>_s_std`` wall seconds per stage s in STAGES and ``total``
``device_h_<s>``                   device hours per stage (mean over seeds): GPU hours on a
                                   GPU, CPU core-hours (process CPU time) on a CPU
``device_h_total``                 their sum
``train_wall_h``                   wall hours to a trained segmenter: train_cam + pseudo_masks
                                   + train_seg (mean over seeds; the Pareto plot's x axis)
``device_kind``                    ``gpu`` | ``cpu`` | ``mixed``
``peak_rss_mb, peak_gpu_mb``       largest peak over stages and seeds
``params_total, gmacs_total``      parameters and GMACs (one forward at the input size)
``networks``                       per network: ``name=params/GMACs``
``hardware``                       distinct ``wsss.hardware`` tags
``env``                            the ``wsss.env`` hash of the runs' library versions (one
                                   per row; '' for runs recorded before it existed)
``versions``                       those versions, e.g. ``torch 2.14.1+cu130, timm 1.0.31, ...``
``run_ids``                        the MLflow runs averaged
=================================  ===========================================================

pairwise.csv: ``suite, dataset, metric, a, b, n_matched, seeds, mean_diff, std_diff, ci_low,
ci_high, t, p_value, distinguishable, verdict, p_holm`` (a, b are row labels; diff = a - b; empty
``distinguishable`` when fewer than two seeds match; ``p_holm``: p_value adjusted with Holm's step-down
over the pairs of one suite, dataset and metric, harness/stats.py).

per_class.csv: ``suite, dataset, label, method, variant, code_version, what, class, n, mean,
std, ci_low, ci_high`` (what in cam, mask, val_ss, val_ms, val_ms_crf).

runs.csv: ``experiment, run_id, suite, dataset, method, variant, segmentation, code_version,
seed, trial_id, status, hardware, env, versions, error`` then every metric of :data:`RUN_METRICS`.
"""


from harness.report.csv import write_csvs
from harness.report.document import PROTOCOL, _flag, fmt_hours, fmt_num, fmt_rank, fmt_stat, main_columns, report_blocks, sections
from harness.report.gallery import collect_gallery
from harness.report.leaderboard import (COST_METRICS, COST_STAGES, METRIC_TITLES, PAIRWISE_COLUMNS, PER_CLASS_COLUMNS, PER_CLASS_TITLES,
                                        PER_CLASS_WHATS, PRIMARY_ORDER, QUALITY_METRICS, RANK_METRICS, REPORT_METRICS, RUN_COLUMNS,
                                        RUN_METRICS, SHORT_TITLES, THRESHOLD_METRICS, TRAIN_STAGES, Leaderboard, _oracle_threshold_at_sweep_end,
                                        build_leaderboard, leaderboard_columns, per_class_whats, primary_metric, suite_references,
                                        suite_seeds)
from harness.report.markdown import to_markdown
from harness.report.store import GALLERY_KINDS, _run_row, fetch_curves, fetch_gallery, fetch_runs, store_suites
from harness.report.terminal import leaderboard_table
from harness.report.writer import write_report

__all__ = [
    "COST_METRICS", "COST_STAGES", "GALLERY_KINDS", "METRIC_TITLES", "PAIRWISE_COLUMNS", "PER_CLASS_COLUMNS", "PER_CLASS_TITLES",
    "PER_CLASS_WHATS", "PRIMARY_ORDER", "PROTOCOL", "QUALITY_METRICS", "RANK_METRICS", "REPORT_METRICS", "RUN_COLUMNS", "RUN_METRICS",
    "SHORT_TITLES", "THRESHOLD_METRICS", "TRAIN_STAGES", "Leaderboard", "build_leaderboard", "collect_gallery", "fetch_curves",
    "fetch_gallery", "fetch_runs", "fmt_hours", "fmt_num", "fmt_rank", "fmt_stat", "leaderboard_columns", "leaderboard_table",
    "main_columns", "per_class_whats", "primary_metric", "report_blocks", "sections", "store_suites", "suite_references", "suite_seeds",
    "to_markdown", "write_csvs", "write_report", "_flag", "_oracle_threshold_at_sweep_end", "_run_row",
]
