"""`forgetless sweep` and `forgetless report` end to end on the tiny model: every run in the table, the
recommendation honours the budget, an interrupted sweep resumes without redoing finished runs, the report
has every section, and it renders in a real headless Chromium without console errors."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_recipe

import forgetless.sweep as sweep_mod
from forgetless.errors import ForgetlessError, RecipeError
from forgetless.report import build_report, frontier_line, pareto, write_report
from forgetless.sweep import load_sweep, recommend, run_sweep


def _sweep_file(tmp_path: Path, tiny_model: Path, toy_data: dict, **extra) -> Path:
    base = tiny_recipe(tiny_model, toy_data, tmp_path / "unused")
    base["train"].pop("output_dir")
    spec = {
        "name": "tiny",
        "base": base,
        "runs": [
            {"name": "low-lr", "set": {"optim.lr": 3e-4}},
            {"name": "high-lr", "set": {"optim.lr": 3e-3}},
            {"name": "guarded", "set": {
                "optim.lr": 3e-3,
                "monitor": {"suite": "self", "limit": 4, "every": 5, "max_new_tokens": 8},
                "guard": {"budget": 0.001, "require_significant": False, "actions": ["lower_lr", "stop"]},
            }},
        ],
        "task_suite": "auto",
        "retention_suite": "self",
        "limit": 6,
        "budget": "5%",
        "output_dir": str(tmp_path / "sweep"),
        **extra,
    }
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, tiny_model, toy_data):
    """A 3-run sweep that was interrupted after its first run, then resumed."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = _sweep_file(tmp, tiny_model, toy_data)
    real = sweep_mod.run_one
    calls: list[str] = []

    def failing(spec):
        if spec["recipe"]["name"] == "high-lr":
            raise KeyboardInterrupt("simulated interruption")
        calls.append(spec["recipe"]["name"])
        return real(spec)

    sweep_mod.run_one = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(path, quiet=True)
    finally:
        sweep_mod.run_one = real
    partial = json.loads((tmp / "sweep" / "sweep.json").read_text())
    first_summary = (tmp / "sweep" / "runs" / "low-lr" / "summary.json").read_text()
    calls2: list[str] = []

    def counting(spec):
        calls2.append(spec["recipe"]["name"])
        return real(spec)

    sweep_mod.run_one = counting
    try:
        state = run_sweep(path, quiet=True)
    finally:
        sweep_mod.run_one = real
    return {"dir": tmp / "sweep", "state": state, "partial": partial, "calls": calls, "calls2": calls2,
            "first_summary": first_summary, "path": path}


def test_sweep_table_has_every_run_and_resume_skips_finished(finished_sweep):
    f = finished_sweep
    assert [r["run"] for r in f["partial"]["runs"]] == ["low-lr"]
    assert f["calls"] == ["low-lr"] and f["calls2"] == ["high-lr", "guarded"]  # low-lr not redone
    assert (f["dir"] / "runs" / "low-lr" / "summary.json").read_text() == f["first_summary"]
    state = json.loads((f["dir"] / "sweep.json").read_text())
    assert [r["run"] for r in state["runs"]] == ["low-lr", "high-lr", "guarded"]
    for r in state["runs"]:
        lo, hi = r["task"]["ci"]
        assert lo <= r["task"]["gain"] <= hi
        lo, hi = r["retention"]["ci"]
        assert lo <= r["retention"]["change"] <= hi
        assert r["trainable_parameters"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0
        assert (Path(r["dir"]) / "eval-task.json").is_file() and (Path(r["dir"]) / "eval-retention.json").is_file()
    # every run learned the task: held-out answer cross-entropy fell significantly
    assert all(r["task"]["gain"] > 0 and r["task"]["significant"] for r in state["runs"])
    # the high learning rate learned more than the low one
    gains = {r["run"]: r["task"]["gain"] for r in state["runs"]}
    assert gains["high-lr"] > gains["low-lr"]
    # a third invocation has nothing left to do
    again = run_sweep(f["path"], quiet=True, report=False)
    assert [r["run"] for r in again["runs"]] == ["low-lr", "high-lr", "guarded"]


def test_recommended_run_honours_the_budget(finished_sweep):
    rows = finished_sweep["state"]["runs"]
    drops = sorted(-r["retention"]["change"] for r in rows)
    for budget in (*[d + 1e-9 for d in drops], 0.05):
        name = recommend(rows, budget)
        within = [r for r in rows if -r["retention"]["change"] <= budget]
        if not within:
            assert name is None
            continue
        chosen = next(r for r in rows if r["run"] == name)
        assert -chosen["retention"]["change"] <= budget
        assert chosen["task"]["gain"] == max(r["task"]["gain"] for r in within)


def test_recommend_on_hand_made_rows():
    rows = [
        {"run": "a", "task": {"gain": 1.0}, "retention": {"change": -0.03}},
        {"run": "b", "task": {"gain": 0.8}, "retention": {"change": -0.009}},
        {"run": "c", "task": {"gain": 0.5}, "retention": {"change": 0.002}},
    ]
    assert recommend(rows, 0.01) == "b"
    assert recommend(rows, 0.05) == "a"
    assert recommend(rows, 0.001) == "c"
    assert recommend(rows, None) is None
    assert recommend([rows[0]], 0.01) is None


def test_pareto_front():
    pts = [(0.0, 0.0, "base"), (-1.0, 2.0, "a"), (-2.0, 1.5, "b"), (-0.5, 1.0, "c")]
    assert [p[2] for p in pareto(pts)] == ["a", "c", "base"]


def test_report_has_every_section(finished_sweep):
    html = build_report(finished_sweep["dir"])
    for anchor in ('id="frontier-plot"', 'id="runs-table"', 'id="training"', 'class="retention-table"', 'id="drift"'):
        assert anchor in html, anchor
    assert html.count('class="plot curves"') == 3
    assert html.count('class="plot drift"') == 3
    assert "(recommended)" in html or "No run stays within the budget" in html
    # monitor probes and guard events of the guarded run are in its metrics and shown
    recs = [json.loads(x)
            for x in (finished_sweep["dir"] / "runs" / "guarded" / "metrics.jsonl").read_text().splitlines()]
    assert any("fl_retention" in r for r in recs)
    assert ('class="guard-events"' in html) == any("guard" in r for r in recs)
    drift = json.loads((finished_sweep["dir"] / "runs" / "high-lr" / "drift.json").read_text())
    assert drift["blocks"][0] == "embeddings" and all(v > 0 for v in drift["relative_change"])
    assert (finished_sweep["dir"] / "report.html").is_file()  # the sweep wrote it at the end


def test_report_for_a_lone_run_without_evaluation(tmp_path, tiny_model, toy_data):
    from forgetless.recipe import recipe_from_dict
    from forgetless.train import train

    train(recipe_from_dict(tiny_recipe(tiny_model, toy_data, tmp_path / "run", optim__max_steps=5)), quiet=True)
    out = write_report(tmp_path / "run")
    html = out.read_text()
    assert "No evaluation found" in html and 'class="plot curves"' in html and 'class="plot drift"' in html
    with pytest.raises(ForgetlessError, match="neither a run directory"):
        build_report(tmp_path)


def test_drift_of_a_run_whose_base_is_a_hub_id(tmp_path, tiny_model, toy_data, monkeypatch):
    import forgetless.train.model as model_mod
    from forgetless.recipe import recipe_from_dict
    from forgetless.report.gather import layer_drift
    from forgetless.train import train

    run = tmp_path / "run"
    train(recipe_from_dict(tiny_recipe(tiny_model, toy_data, run, optim__max_steps=3, optim__lr=1e-2)), quiet=True)
    summary = json.loads((run / "summary.json").read_text())
    summary["model"]["path"] = "someone/tiny"  # as a run from the hub records it: the id, not a folder
    (run / "summary.json").write_text(json.dumps(summary))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # read when imported: the env var set by conftest is too late
    assert layer_drift(run) is None  # neither cached here nor reachable: no chart, no error
    real = model_mod.load_model
    monkeypatch.setattr(model_mod, "load_model", lambda p, *a, **k: real(tiny_model if p == "someone/tiny" else p,
                                                                          *a, **k))
    drift = layer_drift(run)  # loadable (here: from the cache the run filled): the chart is made
    assert drift is not None and all(v > 0 for v in drift["relative_change"])


def test_sweep_file_errors_name_the_key(tmp_path, tiny_model, toy_data):
    p = _sweep_file(tmp_path, tiny_model, toy_data, budget="lots")
    with pytest.raises(RecipeError, match=r"budget.*line \d+.*1%"):
        load_sweep(p)
    p = _sweep_file(tmp_path, tiny_model, toy_data)
    spec = yaml.safe_load(p.read_text())
    spec["runs"][1]["set"] = {"optim.lr": "fast"}
    p.write_text(yaml.safe_dump(spec))
    with pytest.raises(RecipeError, match=r"(?s)sweep run high-lr.*optim.lr: Input should be a valid number"):
        run_sweep(p, quiet=True)
    assert not (tmp_path / "sweep").exists()  # bad input fails before anything is written


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (.ci/run installs the Debian package `chromium`)")
def test_report_renders_in_headless_chromium(finished_sweep):
    import base64
    import re

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    report = finished_sweep["dir"] / "report.html"
    html = report.read_text()
    expected = [_png_size(base64.b64decode(m)) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    assert len(expected) >= 7  # frontier + 3 curves + 3 drift charts
    artifacts = Path(os.environ.get("FORGETLESS_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.resolve().as_uri(), wait_until="load")
        sizes = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        shown = page.evaluate("Array.from(document.images).map(i => i.getBoundingClientRect().width)")
        page.screenshot(path=str(artifacts / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert [tuple(s[1:]) for s in sizes] == [tuple(e) for e in expected]
    assert all(s[0] and s[1] > 100 and s[2] > 100 for s in sizes)
    assert all(w > 100 for w in shown)
    assert (artifacts / "report.png").stat().st_size > 10_000


@pytest.mark.slow  # subprocesses / torchrun: minutes of the default run; CI runs it (make test-slow)
def test_sweep_jobs_runs_in_worker_processes(tmp_path, tiny_model, toy_data):
    path = _sweep_file(tmp_path, tiny_model, toy_data, runs=[], grid={"optim.lr": [3e-4, 3e-3]}, limit=4)
    state = run_sweep(path, jobs=2, quiet=True, report=False)
    assert sorted(r["run"] for r in state["runs"]) == ["lr=0.0003", "lr=0.003"]
    pids = {json.loads((Path(r["dir"]) / "summary.json").read_text())["pid"] for r in state["runs"]}
    assert os.getpid() not in pids
    assert all(r["task"]["gain"] > 0 for r in state["runs"])


def test_the_frontier_line_joins_runs_only_never_the_base():
    def row(run, change, gain):
        return {"run": run, "retention": {"change": change}, "task": {"gain": gain}}

    rows = [row("full", -0.12, 1.3), row("lora", -0.16, 1.2), row("kl", -0.03, 1.1), row("bad", -0.01, -0.2)]
    # the base (0, 0) would dominate "bad" and end the line at the origin; the line is the runs' own front
    assert [p[2] for p in frontier_line(rows)] == ["full", "kl", "bad"]
    assert frontier_line([row("only", -0.2, 0.5)]) == [(-20.0, 0.5, "only")]


def test_frontier_labels_of_a_tight_cluster_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from forgetless.report import place_labels

    fig, ax = plt.subplots(figsize=(7.5, 5))
    pts = ([(-0.3 + 0.01 * i, 0.5 + 0.002 * i, f"full-recipe-{i}") for i in range(7)]
           + [(-2.0, 0.1, "lora"), (0.0, 0.0, "base")])
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o")
    anns = place_labels(ax, pts)
    from matplotlib.text import Text

    fig.canvas.draw()  # as saving does: puts every label where it is drawn
    r = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(a, r) for a in anns]  # the text alone (an Annotation's own extent adds its line)
    assert [a.get_text() for a in anns] and sorted(a.get_text() for a in anns) == sorted(p[2] for p in pts)
    overlapping = [(anns[i].get_text(), anns[j].get_text()) for i in range(len(boxes)) for j in range(i)
                   if boxes[i].overlaps(boxes[j])]
    assert not overlapping
    assert any(a.arrow_patch is not None for a in anns)  # labels pushed away from a crowded point get a leader line
    plt.close(fig)


def test_a_resumed_sweep_scores_again_what_its_evaluation_change_made_stale(tmp_path, tiny_model, toy_data,
                                                                            monkeypatch):
    """Resuming after --limit (or a suite, its items, the precision) changed scores every finished run again on
    the new items (its training reused); a run whose evaluation files are gone is scored again; a lone run left
    for `--jobs 2` gets every core; `--budget 2` (meant as 2%) is refused as the file's budget would be."""
    path = _sweep_file(tmp_path, tiny_model, toy_data)
    spec = yaml.safe_load(path.read_text())
    spec["runs"] = spec["runs"][:1]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ForgetlessError, match=r"--budget 2\b.*a fraction"):
        run_sweep(path, quiet=True, report=False, budget=2.0)
    real, specs = sweep_mod.run_one, []
    monkeypatch.setattr(sweep_mod, "run_one", lambda s: specs.append(s) or real(s))
    first = run_sweep(path, quiet=True, report=False, jobs=2)
    assert [s["threads"] for s in specs] == [None]
    summary = (tmp_path / "sweep" / "runs" / "low-lr" / "summary.json").read_text()
    again = run_sweep(path, quiet=True, report=False)["runs"][0]
    assert len(specs) == 1 and again["retention"]["change"] == first["runs"][0]["retention"]["change"]

    spec["limit"] = 4
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    changed = run_sweep(path, quiet=True, report=False)
    assert len(specs) == 2, "the finished run should be scored again on the new items"
    assert (tmp_path / "sweep" / "runs" / "low-lr" / "summary.json").read_text() == summary  # training reused
    ret = json.loads((tmp_path / "sweep" / "runs" / "low-lr" / "eval-retention.json").read_text())
    assert ret["settings"]["limit"] == 4 and all(t["n"] == 4 for t in ret["candidate"].values())
    assert changed["eval_key"] != first["eval_key"]

    (tmp_path / "sweep" / "runs" / "low-lr" / "eval-task.json").unlink()
    run_sweep(path, quiet=True, report=False)
    assert len(specs) == 3 and (tmp_path / "sweep" / "runs" / "low-lr" / "eval-task.json").is_file()


def test_a_sweep_reported_from_elsewhere_finds_its_runs(finished_sweep, tmp_path):
    """Rows record their run directory as the sweep was run (relative by default): a report run from another
    directory, or of a moved sweep, finds the runs under the sweep's own runs/."""
    from forgetless.report.gather import gather

    moved = tmp_path / "moved"
    shutil.copytree(finished_sweep["dir"], moved)
    state = json.loads((moved / "sweep.json").read_text())
    for r in state["runs"]:
        r["dir"] = f"sweeps/tiny/runs/{Path(r['dir']).name}"  # relative to a working directory we are not in
    (moved / "sweep.json").write_text(json.dumps(state))
    assert gather(moved)["runs"] == [moved / "runs" / r["run"] for r in state["runs"]]


@pytest.mark.slow  # worker processes: about a minute
def test_with_jobs_a_failed_run_starts_no_queued_run(tmp_path, tiny_model, toy_data):
    """A run that fails (here it diverges at once) stops the sweep without starting the runs still queued (they
    used to train on unrecorded until the pool emptied); the runs that finished are in sweep.json."""
    path = _sweep_file(tmp_path, tiny_model, toy_data, runs=[
        {"name": "boom", "set": {"optim.lr": 3.0, "optim.schedule": "constant_with_warmup", "optim.warmup_steps": 8,
                                 "train.logging_steps": 1}},
        *({"name": f"r{i}", "set": {"optim.max_steps": 60}} for i in range(4))], limit=4)
    with pytest.raises(Exception, match="diverged"):
        run_sweep(path, jobs=2, quiet=True, report=False)
    started = [n for n in ("r0", "r1", "r2", "r3") if (tmp_path / "sweep" / "runs" / n / "recipe.yaml").is_file()]
    assert len(started) < 4, started
    state = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert {r["run"] for r in state["runs"]} <= set(started)


def test_a_changed_recipe_names_the_one_stale_run_folder_when_it_holds_nothing(tmp_path, tiny_model, toy_data):
    """A run whose recipe changed is refused. If its folder holds no finished run and no complete checkpoint, the
    error names that folder. --overwrite would also delete every finished run beside it."""
    from forgetless.orchestration import refuse_changed_recipes
    from forgetless.recipe import dump_recipe, recipe_from_dict
    from forgetless.train.callbacks import COMPLETE_MARKER

    run_dir = tmp_path / "runs" / "a"
    old = recipe_from_dict(tiny_recipe(tiny_model, toy_data, run_dir))
    new = recipe_from_dict(tiny_recipe(tiny_model, toy_data, run_dir, optim__lr=1e-3))
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(old))
    refuse_changed_recipes([("sweep run a", run_dir, old)], "the sweep")  # unchanged: resumed
    with pytest.raises(ForgetlessError, match=r"holds neither a finished run nor a complete checkpoint") as e:
        refuse_changed_recipes([("sweep run a", run_dir, new)], "the sweep")
    assert str(run_dir) in str(e.value)
    # a complete checkpoint (or a finished run) is something to lose: only --overwrite is offered
    (run_dir / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-10" / COMPLETE_MARKER).write_text("")
    with pytest.raises(ForgetlessError, match=r"its recipe changed since .*; pass --overwrite") as e:
        refuse_changed_recipes([("sweep run a", run_dir, new)], "the sweep")
    assert "deleting" not in str(e.value)
