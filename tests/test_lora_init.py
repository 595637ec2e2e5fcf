"""method.init for LoRA: every init leaves the model's output unchanged at step 0; inits that move part of the
base into the adapter (pissa, orthonormal, milora) save a standard LoRA against the original base, which reloads
and merges to the trained model; MiLoRA's decomposition by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe

from forgetless.errors import RecipeError
from forgetless.methods.lora import minor_components
from forgetless.recipe import ModelConfig, recipe_from_dict
from forgetless.train import train
from forgetless.train.model import load_model, prepare_model

INITS = ["default", "gaussian", "pissa", "orthonormal", "milora",
         *(pytest.param(i, marks=pytest.mark.slow) for i in ("corda_kpm", "corda_ipm", "eva"))]  # calibrate first


def test_milora_takes_the_smallest_singular_components_by_hand():
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    w = q1[:, :5] @ torch.diag(s) @ q2.T  # 6 x 5, singular values 5..1
    a, b, residual = minor_components(w, r=2, scaling=2.0)
    assert a.shape == (2, 5) and b.shape == (6, 2)
    minor = q1[:, 3:5] @ torch.diag(s[3:]) @ q2[:, 3:].T  # the components with singular values 2 and 1
    torch.testing.assert_close(2.0 * b @ a, minor, atol=1e-5, rtol=0)
    torch.testing.assert_close(residual, w - minor, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:3], s[:3], atol=1e-5, rtol=0)
    # A's rows are orthogonal, B's columns too (both carry sqrt of the scaled singular values)
    torch.testing.assert_close(a @ a.T, torch.diag(s[3:] / 2.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.T @ b, torch.diag(s[3:] / 2.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", INITS)
def test_every_init_leaves_the_output_unchanged_at_step_0(init, tiny_model, capsys):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    from forgetless.data import build_examples, calibration_examples, load_records
    from forgetless.testing import copy_task, write_jsonl
    from forgetless.train.model import load_tokenizer

    calib = write_jsonl(tiny_model.parent / "calib.jsonl", copy_task(48, seed=7, fmt="instruction"))
    extra = {"init_data": {"train": str(calib), "format": "instruction"}} if init == "corda_kpm" else {}
    method = recipe_from_dict({"model": str(tiny_model), "data": {"train": "t"},
                               "method": {"name": "lora", "r": 4, "init": init, "init_samples": 32, **extra}}).method
    tok = load_tokenizer(str(tiny_model))
    train_ex, _ = build_examples(load_records(str(calib)), method.init_data or __import__(
        "forgetless.config", fromlist=["DataConfig"]).DataConfig(train=str(calib)), tok)
    seen = []

    def calibration(cfg, n):
        seen.append((cfg, n))
        return calibration_examples(cfg, n, train_ex, tok, 0)

    model = prepare_model(str(tiny_model), ModelConfig(name=str(tiny_model)), method, torch.device("cpu"),
                          tokenizer=tok, calibration=calibration).eval()
    data_driven = init in ("corda_kpm", "corda_ipm", "eva")
    assert bool(seen) == data_driven and all(n == 32 for _, n in seen)
    # the calibration (minutes on a real model) says it is running: a log's reader sees why no step has come yet
    assert (f"method.init {init}: " in capsys.readouterr().err) == data_driven
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        want, got = base(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    moved = init in ("pissa", "orthonormal", "milora", "corda_kpm", "corda_ipm")
    # the moving inits put non-zero weights in B (part of the base); default and gaussian start B at zero
    assert any(float(p.abs().max()) > 0 for p in lora_b) == moved


@pytest.mark.slow  # three short trainings with a merge and reloads (~25 s)
@pytest.mark.parametrize("init", ["pissa", "orthonormal", "milora", "corda_ipm"])
def test_moved_inits_save_a_standard_lora_that_reloads_and_merges(init, tiny_model, toy_data, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = tiny_recipe(tiny_model, toy_data, tmp_path / init, optim__max_steps=3, train__merge=True,
                       train__save_steps=2)
    spec["method"] = {"name": "lora", "r": 4, "init": init, **({"init_samples": 32} if init == "corda_ipm" else {})}
    res = train(recipe_from_dict(spec), quiet=True)
    run = tmp_path / init
    assert (run / "initial_adapter" / "adapter_config.json").is_file()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
        base_logits = base(ids).logits
        trained = res.model.eval()(ids).logits
        reloaded, _ = load_model(run)  # the original base + the converted adapter
        merged, _ = load_model(run / "merged")
        torch.testing.assert_close(reloaded(ids).logits, trained, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(merged(ids).logits, trained, atol=1e-4, rtol=1e-4)
        # a checkpoint holds the adapter against the residual base: loaded, it is converted like the final one
        ckpt, _ = load_model(run / "checkpoints" / "checkpoint-3")
        torch.testing.assert_close(ckpt(ids).logits, trained, atol=1e-4, rtol=1e-4)
        with ckpt.disable_adapter():
            torch.testing.assert_close(ckpt(ids).logits, base_logits, atol=1e-5, rtol=1e-5)
        early, _ = load_model(run / "checkpoints" / "checkpoint-2")  # one step before: another model
        assert not torch.allclose(early(ids).logits, trained, atol=1e-4)
        # the saved adapter is a LoRA against the original base: disabled, it is the base model itself
        with reloaded.disable_adapter():
            torch.testing.assert_close(reloaded(ids).logits, base_logits, atol=1e-5, rtol=1e-5)
        # WiSE-FT (forgetless merge --alpha) scales the converted adapter: halfway between the base and the tuned
        from forgetless.merge import merge

        assert merge(str(tiny_model), str(run), 0.5, tmp_path / "half")["kind"] == "lora adapter (scaled)"
        half = load_model(tmp_path / "half")[0].merge_and_unload().state_dict()
        tuned, b = merged.state_dict(), base.state_dict()
        for k in b:
            torch.testing.assert_close(half[k], (b[k] + tuned[k]) / 2, atol=2e-6, rtol=1e-5)
    import json

    cfg = json.loads((run / "final" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True  # rank 2r: [A | A0], [B | -B0]


@pytest.mark.slow
def test_eva_calibrates_on_the_training_data_in_a_run(tiny_model, toy_data, tmp_path):
    spec = tiny_recipe(tiny_model, toy_data, tmp_path / "eva", optim__max_steps=2)
    spec["method"] = {"name": "lora", "r": 4, "init": "eva", "init_samples": 32}
    res = train(recipe_from_dict(spec), quiet=True)
    a = [p for n, p in res.model.named_parameters() if "lora_A" in n]
    assert a and not (tmp_path / "eva" / "initial_adapter").exists()  # eva keeps the base: no conversion
    reloaded, _ = load_model(tmp_path / "eva")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, res.model.eval()(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_eva_with_dora_starts_at_the_base_and_reloads(tiny_model, toy_data, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = tiny_recipe(tiny_model, toy_data, tmp_path / "dora-eva", optim__max_steps=2, optim__lr=1e-2)
    spec["method"] = {"name": "dora", "r": 4, "init": "eva", "init_samples": 32}
    recipe = recipe_from_dict(spec)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    from forgetless.data import build_examples, load_records
    from forgetless.data import calibration_examples as calib
    from forgetless.train.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    examples, _ = build_examples(load_records(recipe.data.train), recipe.data, tok)
    model = prepare_model(str(tiny_model), ModelConfig(name=str(tiny_model)), recipe.method, torch.device("cpu"),
                          tokenizer=tok, calibration=lambda cfg, n: calib(cfg, n, examples, tok, 0)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=2e-5, rtol=1e-4)
        assert any(n.endswith("lora_magnitude_vector.default.weight") for n, _ in model.named_parameters())
    res = train(recipe, quiet=True)
    reloaded, _ = load_model(tmp_path / "dora-eva")
    with torch.no_grad():
        trained = res.model.eval()(ids).logits
        assert not torch.allclose(trained, base(ids).logits, atol=1e-4)  # it trained
        torch.testing.assert_close(reloaded(ids).logits, trained, atol=1e-4, rtol=1e-4)


def test_inits_refuse_what_they_would_make_wrong():
    def recipe(method, **extra):
        return recipe_from_dict({"model": "m", "data": {"train": "t"}, "method": method, **extra})

    with pytest.raises(RecipeError, match="mitigations.kl: not supported with method.init pissa"):
        recipe({"name": "lora", "init": "pissa"}, mitigations=[{"name": "kl"}])
    for name in ("self_replay", "olora"):  # each reads the base behind disabled adapters or pulls B toward zero
        with pytest.raises(RecipeError, match=f"mitigations.{name}: not supported with method.init milora"):
            recipe({"name": "lora", "init": "milora"}, mitigations=[{"name": name}])
    with pytest.raises(RecipeError, match="data.self_distill: not supported with method.init orthonormal"):
        recipe({"name": "lora", "init": "orthonormal"}, data={"train": "t", "self_distill": {}})
    with pytest.raises(RecipeError, match="bias: all is not supported with init pissa"):
        recipe({"name": "lora", "init": "pissa", "bias": "all"})
    assert recipe({"name": "lora", "init": "gaussian", "bias": "all"}).method.bias == "all"
    with pytest.raises(RecipeError, match="init_data.self_distill: only the training data"):
        recipe({"name": "lora", "init": "eva", "init_data": {"train": "q.jsonl", "self_distill": {}}})
    with pytest.raises(RecipeError, match="init: corda_kpm needs init_data"):
        recipe({"name": "lora", "init": "corda_kpm"})
    with pytest.raises(RecipeError, match="init_data: used by init corda_kpm, corda_ipm or eva only"):
        recipe({"name": "lora", "init": "pissa", "init_data": {"train": "q.jsonl"}})
    with pytest.raises(RecipeError, match="init: milora is supported with method lora only.*no DoRA magnitude"):
        recipe({"name": "dora", "init": "milora"})
    with pytest.raises(RecipeError, match=r"init: pissa is supported with method lora only.*Quant\(W_res\)"):
        recipe({"name": "qlora", "init": "pissa"})
    with pytest.raises(RecipeError, match="init: eva is not supported with method qlora"):
        recipe({"name": "qlora", "init": "eva"})
    assert recipe({"name": "dora", "init": "eva"}).method.init == "eva"
    assert recipe({"name": "dora", "init": "gaussian"}).method.init == "gaussian"
    assert not recipe({"name": "lora", "init": "gaussian"}).method.moves_base
