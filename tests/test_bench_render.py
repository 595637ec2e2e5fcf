"""Every committed bench result's markdown is what its script renders from the JSON alone (issue 24,
deliverable 6): no hand edits in a .md, no figure that is not in the JSON. Hand-written remarks live in
*.notes.md files, which no script writes."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))  # forgetting.py is imported by its siblings
    try:
        spec = importlib.util.spec_from_file_location(f"_render_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def _render(script: str, result: dict, saved: Path) -> str:
    mod = _bench_module(script)
    if script == "forgetting":
        return mod.render_md(result, saved.with_suffix(".png").name)
    if script == "retention_precision":
        return mod.markdown(result)
    return mod.render_md(result)


# (script, JSON results it renders); eval_speed's writer adds no newline at the end of its markdown
CASES = [("throughput", "throughput*.json"), ("monitor_cost", "monitor_cost*.json"), ("overhead", "overhead*.json"),
         ("continual", "continual.json"), ("suite_time", "suite_time.json"), ("forgetting", "forgetting-*.json"),
         ("retention_precision", "retention-precision-*.json"), ("eval_speed", "eval_speed.json"),
         ("frontier", "frontier-*.json")]
SAVED = [(script, path) for script, pattern in CASES for path in sorted(RESULTS.glob(pattern))]


@pytest.mark.parametrize(("script", "saved"), SAVED, ids=[p.stem for _, p in SAVED])
def test_committed_markdown_is_rendered_from_its_json(script, saved):
    md = saved.with_suffix(".md")
    assert md.is_file(), f"{saved.name} has no markdown beside it: run bench/{script}.py --render {saved}"
    assert _render(script, json.loads(saved.read_text()), saved) == md.read_text(), (
        f"{md.name} is not bench/{script}.py's rendering of {saved.name}: re-render it (--render), and put "
        "hand-written remarks in a .notes.md file")


def test_every_result_json_with_markdown_is_covered():
    covered = {p for _, p in SAVED} | set(RESULTS.glob("precision-*.json"))
    uncovered = [p.name for p in RESULTS.glob("*.json") if p.with_suffix(".md").is_file() and p not in covered]
    assert not uncovered, f"results with a markdown but no render test: {uncovered}"


def test_a_result_without_provenance_says_so():
    from forgetless.provenance import provenance_line

    assert provenance_line({}).startswith("Provenance: not recorded")
    mod = _bench_module("throughput")
    result = {"model": "m", "batch": 8, "seq": 256, "steps": 6, "repeats": 1,
              "rows": [{"method": "full", "bare_tokens_per_s": 34.8, "forgetless_tokens_per_s": 74.1, "ratio": 2.128,
                        "bare_runs": [{"tokens_per_s": 34.8}], "forgetless_runs": [{"tokens_per_s": 74.1}]}]}
    md = mod.render_md(result)
    assert "not judged (no provenance)" in md and "PASS" not in md
    result["provenance"] = {"precision": {"dtype": "bf16"}, "machine": {"cpu": "x"}}
    assert "SUSPECT" in mod.render_md(result)  # 2.1x faster than a loop doing the same work cannot be right
    result["rows"][0].update(ratio=0.97, forgetless_tokens_per_s=33.8, forgetless_runs=[{"tokens_per_s": 33.8}])
    assert "| 0.970x | 0.971 | PASS" in mod.render_md(result)


def test_monitor_cost_is_judged_on_the_side_by_side_wall_ratio():
    mod = _bench_module("monitor_cost")
    runs = {"plain-1": {"wall_time_s": 100.0}, "monitored-1": {"wall_time_s": 118.0, "monitor": {
        "probe_s": 5.0, "probes": [1, 2]}}, "plain-2": {"wall_time_s": 104.0},
        "monitored-2": {"wall_time_s": 110.0, "monitor": {"probe_s": 5.0, "probes": [1, 2]}}, "plain-3": {
        "wall_time_s": 96.0}}
    got = mod.judge(runs, list(runs))
    # 118 / 102 = 1.157, 110 / 100 = 1.100; mean 1.1285: the monitor adds 12.9% < 15% -> PASS, though its own
    # timing (5 s of ~114) says 4.4%
    assert got["wall_ratios"] == [1.157, 1.1] and got["wall_ratio_vs_plain"] == 1.129 and got["verdict"] == "PASS"
    assert got["probe_share"] == round((5 / 118 + 5 / 110) / 2, 4)
    runs["monitored-2"]["wall_time_s"] = 125.0  # 1.25: mean 1.2035 -> FAIL
    assert mod.judge(runs, list(runs))["verdict"] == "FAIL" and got["ratio_on"] == "wall_time_s"
    # each process timed from start to exit (the final probe runs after the training loop): judged on that
    for name, t in zip(runs, (101.0, 140.0, 99.0, 112.0, 97.0), strict=True):
        runs[name]["process_s"] = t
    timed = mod.judge(runs, list(runs))
    # 140 / 100 = 1.4, 112 / 98 = 1.143; mean 1.2715 -> FAIL, though the loops alone (1.157, 1.25) say 1.2035
    assert timed["ratio_on"] == "process_s" and timed["wall_ratios"] == [1.4, 1.143]
    assert timed["wall_ratio_vs_plain"] == 1.272 and timed["verdict"] == "FAIL"
    for r in runs.values():
        r["tokens_per_s"] = 1000.0
    result = {"model": "m", "steps": 10, "batch": 8, "seq": 128, "machine": {"platform": "p", "loadavg_start": 0.1,
              "loadavg_end": 0.2}, "monitor": "defaults", "runs": runs, "target_share": 0.15, **timed}
    md = mod.render_md(result)
    assert "| monitored-1 | 140.0 | 118.0 | 1000 | 5.0 | 4.2% |" in md
    assert "Process time of each monitored run (start to exit)" in md and "1.400x, 1.143x; mean 1.272x -> FAIL" in md
    del runs["plain-3"]["process_s"]  # one run without it: all judged on the loop's time, as saved before
    assert mod.judge(runs, list(runs))["ratio_on"] == "wall_time_s"


RENDER_SCRIPTS = [s for s, _ in CASES] + ["precision"]


@pytest.mark.parametrize("script", RENDER_SCRIPTS)
def test_render_flag_rewrites_the_markdown_beside_a_saved_json_and_names_a_bad_file(script, tmp_path, monkeypatch):
    """`bench/<script>.py --render FILE` writes FILE.md from FILE.json alone (the committed markdown, for a copy of
    a committed result), and a missing, non-JSON or non-object FILE stops it with one line naming the file."""
    pattern = dict(CASES).get(script, "precision-*.json")
    committed = sorted(RESULTS.glob(pattern))[0]
    saved = tmp_path / committed.name
    shutil.copy(committed, saved)
    mod = _bench_module(script)
    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/<script>.py` runs: its siblings importable
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--render", str(saved)])
    mod.main()
    assert saved.with_suffix(".md").read_text() == committed.with_suffix(".md").read_text()
    assert json.loads(saved.read_text()) == json.loads(committed.read_text())  # the saved result is left as it was
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".png")) == [
        saved.name, saved.with_suffix(".md").name]  # nothing else written (forgetting also redraws its .png)
    (tmp_path / "array.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text('{"rows": [')
    for name, message in (("missing.json", "no such file"), ("array.json", "not a bench result (the JSON holds a "
                          "list"), ("broken.json", "not a JSON bench result (Expecting value")):
        monkeypatch.setattr(sys, "argv", [f"{script}.py", "--render", str(tmp_path / name)])
        with pytest.raises(SystemExit) as e:
            mod.main()
        assert str(e.value).startswith(f"error: --render {tmp_path / name}: {message}")
        assert not (tmp_path / name).with_suffix(".md").exists()
