"""A new mitigation or training method is one new file: the examples of docs/plugins.md, added to a copy of the
package and nothing else edited, validate in recipes, train, and are seen by the checks that read declarations."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys
from forgetless.recipe import recipe_from_dict
from forgetless.errors import RecipeError
from forgetless.train import train
from forgetless import distributed
spec = json.loads(sys.argv[1])
recipe = recipe_from_dict(spec)
res = train(recipe, quiet=True)
out = {"method": res.summary["method"], "mitigations": [m["name"] for m in res.summary["mitigations"]],
       "trainable": res.summary["trainable_parameters"], "total": res.summary["total_parameters"]}
import torch
from forgetless.train.model import load_model
base, _ = load_model(spec["model"])
tuned = dict(res.model.named_parameters())
out["changed"] = sorted(n for n, p in base.named_parameters() if not torch.equal(p.detach(), tuned[n].detach()))
try:
    recipe_from_dict({**spec, "method": "lroa"})
except RecipeError as e:
    out["unknown_method_error"] = str(e)
spec2 = json.loads(json.dumps(spec))
spec2["train"]["distributed"] = {"engine": "fsdp"}
spec2["train"]["device"] = "cuda"
try:
    distributed.check_recipe(recipe_from_dict(spec2))
except RecipeError as e:
    out["fsdp_error"] = str(e)
print("RESULT " + json.dumps(out))
"""


def _examples() -> dict[str, str]:
    text = (ROOT / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"```python\n(# file: (\S+)\n.*?)```", text, re.S)
    return {path: code for code, path in blocks}


@pytest.mark.slow  # a subprocess importing a copy of the package and training (about 30 s)
def test_docs_examples_are_one_file_plugins(tiny_model, toy_data, tmp_path):
    examples = _examples()
    assert set(examples) == {"src/forgetless/mitigations/l1sp.py", "src/forgetless/methods/norms.py"}
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "forgetless", src / "forgetless", ignore=shutil.ignore_patterns("__pycache__"))
    for rel, code in examples.items():
        target = tmp_path / rel
        assert not target.exists()
        target.write_text(code)
    from conftest import tiny_recipe

    spec = tiny_recipe(tiny_model, toy_data, tmp_path / "run", optim__max_steps=3)
    spec["method"] = "norms"
    spec["mitigations"] = [{"name": "l1sp", "weight": 1e-3}]
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert out["method"] == "norms" and out["mitigations"] == ["l1sp"]
    assert 0 < out["trainable"] < out["total"]
    assert out["changed"] and all("norm" in n for n in out["changed"])  # only normalisation weights trained
    assert re.search(r"unknown method 'lroa'; valid: .*norms", out["unknown_method_error"]), out["unknown_method_error"]
    # the distributed check reads the new mitigation's declaration (its reason, word for word)
    assert "mitigations.l1sp: not supported" in out["fsdp_error"] and "its anchor acts on whole" in out["fsdp_error"]
