"""`forgetless report`: one self-contained report.html (plots inlined) for a run, a sweep or a sequence directory.

Sections: the forgetting frontier (task gain against retention change, interval bars, the frontier line
and the budget line); training curves (loss, validation loss, monitor probe, guard events); the per-task
retention table with significance; a few flipped examples per task; and the layer-wise drift chart
(relative weight change per block, and the EWC penalty per block where the run estimated a Fisher).

A run directory needs its evaluations for the frontier and the retention table (`forgetless eval --model RUN
--suite general --out RUN/eval-retention.json`, and eval-task.json for the target task); `forgetless sweep` writes them.

Reports only read run, sweep and sequence directories: training, sweeps and sequences import this package (or
are handed `write_report`), never the reverse. gather.py reads the directories, plots.py draws, html.py renders
run and sweep reports, continual.py a sequence's.
"""

from .continual import METRIC_NAMES, matrix_plot, trajectory_plot, write_continual_report, write_plots
from .gather import LAYER, gather, layer_drift, read_json, read_jsonl, retention_tables, run_row
from .html import TEMPLATE, build_report, write_report
from .plots import curves_plot, drift_plot, frontier_line, frontier_plot, pareto, place_labels, png, pyplot

__all__ = ["LAYER", "METRIC_NAMES", "TEMPLATE", "build_report", "curves_plot", "drift_plot", "frontier_line",
           "frontier_plot", "gather", "layer_drift", "matrix_plot", "pareto", "place_labels", "png", "pyplot",
           "read_json", "read_jsonl", "retention_tables", "run_row", "trajectory_plot", "write_continual_report",
           "write_plots", "write_report"]
