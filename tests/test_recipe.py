"""Recipe validation: good recipes pass with their defaults, bad ones name the key, the line and what is valid."""

from __future__ import annotations

import pytest

from forgetless.errors import RecipeError
from forgetless.recipe import Recipe, dump_recipe, load_recipe, recipe_from_dict

MINIMAL = {"model": "m", "data": {"train": "t.jsonl"}}


def test_minimal_recipe_gets_defaults():
    r = recipe_from_dict(MINIMAL)
    assert r.method.name == "full"
    assert r.lr == 2e-5  # full FT default
    assert r.data.completion_only  # instruction default
    assert r.model.trust_remote_code is False and r.model.allow_pickle is False
    assert r.train.report_to == ["none"]


def test_the_resolved_recipe_shows_the_defaults_applied_at_run_time():
    r = recipe_from_dict({**MINIMAL, "name": "x", "method": "lora", "optim": {"batch_size": 4}}).resolved()
    assert r["optim"]["lr"] == 2e-4 and r["optim"]["warmup_ratio"] == 0.03 and r["optim"]["warmup_steps"] is None
    assert r["optim"]["eval_batch_size"] == 4 and r["train"]["output_dir"] == "runs/x"
    steps = recipe_from_dict({**MINIMAL, "optim": {"warmup_steps": 5}}).resolved()["optim"]
    assert (steps["warmup_steps"], steps["warmup_ratio"]) == (5, None)  # the two stay exclusive
    # what a run writes reads back as the same recipe (resume and sweeps compare resolved recipes)
    assert recipe_from_dict(r).resolved() == r


def test_method_shorthand_and_method_default_lr():
    r = recipe_from_dict({**MINIMAL, "method": "lora"})
    assert r.method.name == "lora" and r.method.r == 16 and r.lr == 2e-4
    r = recipe_from_dict({**MINIMAL, "method": {"name": "qlora", "r": 8}})
    assert r.method.quant_type == "nf4" and r.method.r == 8


@pytest.mark.parametrize("name", ["full", "lora", "dora", "qlora", "ia3", "prefix", "prompt", "adapter", "freeze"])
def test_every_method_validates(name):
    assert recipe_from_dict({**MINIMAL, "method": name}).method.name == name


def test_overrides_set_nested_keys():
    r = recipe_from_dict({**MINIMAL, "method": "lora"},
                         ["optim.lr=1e-5", "method.r=4", "train.report_to=[tensorboard]"])
    assert r.lr == 1e-5 and r.method.r == 4 and r.train.report_to == ["tensorboard"]


def test_yaml_reads_on_yes_no_as_strings_and_only_true_false_as_booleans(tmp_path):
    # PyYAML's YAML 1.1 reads on/off/yes/no as booleans: kl's documented `on: all` became the key True
    f = tmp_path / "r.yaml"
    f.write_text("model: m\ndata: {train: t.jsonl, system_prompt: no}\nmitigations:\n  - {name: kl, on: all}\n"
                 "  - name: replay\n    data: {train: g.jsonl}\ntrain: {merge: true, bf16: False}\n")
    r = load_recipe(f, ["mitigations.0.on=replay"])
    assert r.mitigations[0].on == "replay" and r.data.system_prompt == "no"
    assert r.train.merge is True and r.train.bf16 is False
    assert load_recipe(f).mitigations[0].on == "all"
    assert recipe_from_dict(MINIMAL, ["data.system_prompt=yes"]).data.system_prompt == "yes"
    # and what dump_recipe writes reads back the same
    again = tmp_path / "again.yaml"
    again.write_text(dump_recipe(r))
    assert load_recipe(again).resolved() == r.resolved()


def test_override_without_equals_is_an_error():
    with pytest.raises(RecipeError, match="KEY.PATH=VALUE"):
        recipe_from_dict(MINIMAL, ["optim.lr"])


def test_overrides_index_lists():
    spec = {**MINIMAL, "mitigations": ["l2sp", {"name": "kl", "weight": 1.0}]}
    r = recipe_from_dict(spec, ["mitigations.1.weight=0.3", "mitigations.0.weight=0.05"])
    assert (r.mitigations[0].weight, r.mitigations[1].weight) == (0.05, 0.3)
    with pytest.raises(RecipeError, match=r"--set mitigations.2.weight: mitigations is a list of 2: '2' is not an "
                                          r"index in it \(0 to 1\)"):
        recipe_from_dict(spec, ["mitigations.2.weight=1"])


def _err(tmp_path, text: str, overrides=None) -> str:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, overrides)
    return str(e.value)


def test_unknown_key_names_path_line_and_valid_keys(tmp_path):
    msg = _err(tmp_path, "model: m\ndata:\n  train: t.jsonl\n  max_lenght: 10\n")
    assert "data.max_lenght (line 4): unknown key" in msg
    assert "max_length" in msg  # the valid keys are listed
    assert str(tmp_path / "recipe.yaml") in msg


def test_unknown_method_lists_valid_ones(tmp_path):
    msg = _err(tmp_path, "model: m\ndata: {train: t.jsonl}\nmethod: {name: lroa}\n")
    assert "unknown method 'lroa'" in msg and "lora" in msg and "qlora" in msg


def test_non_positive_lr_and_wrong_type(tmp_path):
    msg = _err(tmp_path, "model: m\ndata: {train: t.jsonl}\noptim:\n  lr: 0\n  batch_size: many\n")
    assert "optim.lr (line 4): Input should be greater than 0" in msg
    assert "optim.batch_size (line 5)" in msg and "integer" in msg


def test_method_options_are_checked(tmp_path):
    msg = _err(tmp_path, "model: m\ndata: {train: t.jsonl}\nmethod:\n  name: lora\n  r: 0\n  rank: 8\n")
    assert "method.r (line 5)" in msg
    assert "method.rank (line 6): unknown key" in msg


def test_missing_required_sections(tmp_path):
    msg = _err(tmp_path, "name: x\n")
    assert "model: required key is missing" in msg and "data: required key is missing" in msg


def test_impossible_combinations():
    with pytest.raises(RecipeError, match="warmup_steps or warmup_ratio"):
        recipe_from_dict({**MINIMAL, "optim": {"warmup_steps": 5, "warmup_ratio": 0.1}})
    with pytest.raises(RecipeError, match="cannot be merged"):
        recipe_from_dict({**MINIMAL, "method": "prompt", "train": {"merge": True}})
    with pytest.raises(RecipeError, match="activation: identity"):
        recipe_from_dict({**MINIMAL, "method": "adapter", "train": {"merge": True}})
    assert recipe_from_dict({**MINIMAL, "method": {"name": "adapter", "activation": "identity"},
                             "train": {"merge": True}})
    with pytest.raises(RecipeError, match="early_stopping needs train.eval_steps"):
        recipe_from_dict({**MINIMAL, "train": {"early_stopping": {"patience": 2}}})
    with pytest.raises(RecipeError, match="trains nothing"):
        recipe_from_dict({**MINIMAL, "method": {"name": "freeze", "top_k_blocks": 0}})
    with pytest.raises(RecipeError, match="unknown canonical field"):
        recipe_from_dict({**MINIMAL, "data": {"train": "t", "fields": {"question": "q"}}})


def test_invalid_yaml_names_the_line(tmp_path):
    msg = _err(tmp_path, "model: m\ndata: [unclosed\n")
    assert "not valid YAML" in msg and "line" in msg


def test_resolved_recipe_round_trips(tmp_path):
    r = recipe_from_dict({**MINIMAL, "method": "dora"})
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_recipe(r))
    again = load_recipe(p)
    assert again.resolved() == r.resolved()
    assert isinstance(again, Recipe) and again.optim.lr == 2e-4
