"""The demo's one-line verdict (forgetless.demo.headline), on constructed sweep states."""

from __future__ import annotations

from forgetless.demo import headline


def _row(run, gain, gci, change, cci):
    return {"run": run, "task": {"gain": gain, "ci": gci}, "retention": {"change": change, "ci": cci}}


def test_headline_names_the_best_forgetless_recipe_inside_the_budget_with_its_share_and_intervals():
    state = {"budget": 0.05, "runs": [
        _row("full-high-lr", 1.30, [1.20, 1.40], -0.124, [-0.14, -0.11]),
        _row("lora", 1.28, [1.18, 1.38], -0.163, [-0.18, -0.15]),
        _row("full+selfreplay", 1.20, [1.10, 1.30], -0.021, [-0.035, -0.008]),
        _row("full+other", 1.10, [1.00, 1.20], -0.010, [-0.02, 0.0]),
    ]}
    line = headline(state)
    # 1.20 / 1.30 = 92%: the largest gain within 5%; its interval's lower end (-3.5%) is inside too
    assert line.startswith("full+selfreplay kept 92% of the plain recipe's task gain (+1.20 [+1.10, +1.30]) at -2.1%")
    assert "within the 5% budget with 95% confidence" in line and "plain full-high-lr: gain +1.30" in line


def test_headline_says_when_only_the_point_estimate_is_inside_or_nothing_is():
    state = {"budget": 0.05, "runs": [
        _row("full-high-lr", 1.0, [0.9, 1.1], -0.12, [-0.14, -0.10]),
        _row("kl", 0.95, [0.85, 1.05], -0.045, [-0.07, -0.02]),
    ]}
    assert "point estimate; its interval reaches past it" in headline(state)
    state["runs"][1]["retention"]["change"] = -0.06
    assert headline(state).startswith("no forgetless recipe stayed within the 5% budget")
