"""The recipes of docs/prior.md run as written, with smaller sizes.

Every ```python block of the page whose first line is ``# recipe: NAME`` is read from the
file (not copied), the sizes named in :data:`SHRINK` are replaced (each replacement must find
its text, so a recipe that changes its call fails here until the test follows), and the block
runs in one namespace shared by the recipes, after the recipes it builds on.  The model is
the recipes' own 2-D mixture configuration trained briefly into a temporary directory, so
the test needs no cache and checks the calls, not the quality of the numbers.
"""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "prior.md"
RECIPE = re.compile(r"```python\n# recipe: ([\w-]+)\n(.*?)```", re.S)

#: the recipes of the page, in order, and what each one needs run before it
DEPENDS = {
    "setup": [],
    "smc": ["setup"],
    "smc-dense": ["smc"],
    "nuts": ["setup"],
    "svi": ["setup"],
    "heuristics": ["setup"],
    "compare": ["smc", "nuts", "svi", "heuristics"],
    "arviz-runs": ["nuts"],
    "user-svi": ["setup"],
    "user-nuts": ["user-svi"],
}

#: (text in the recipe, its replacement in the test): smaller sizes, and the brief model
SHRINK = {
    "setup": [
        (
            'load_or_train("gmm", "elbo", num_steps=20)',
            'load_or_train("gmm", "elbo", num_steps=20, train_steps=200, root=RECIPE_ROOT)',
        ),
        ("sample((2000,))", "sample((400,))"),
    ],
    "smc": [("num_particles=4000", "num_particles=400"), ("smc.sample(2000)", "smc.sample(400)")],
    "smc-dense": [
        ("mixture.sample(1000)", "mixture.sample(400)"),
        ("num_particles=1000", "num_particles=200"),
    ],
    "nuts": [
        ("num_samples=100, warmup_steps=100", "num_samples=10, warmup_steps=10"),
        ("max_tree_depth=5", "max_tree_depth=3"),
    ],
    "svi": [("num_iterations=500", "num_iterations=20")],
    "heuristics": [
        ("(diffusion, observation, y, 2000)", "(diffusion, observation, y, 400)"),
        ("2000, step_size=0.3", "400, step_size=0.3"),
    ],
    "compare": [("sample(1000), exact[:1000]", "sample(200), exact[:200]")],
    "arviz-runs": [
        ("num_particles=4000", "num_particles=200"),
        ("num_iterations=300", "num_iterations=20"),
        ("from_smc(smc_runs, num_draws=1000)", "from_smc(smc_runs, num_draws=100)"),
        ("from_svi(fits, num_draws=1000)", "from_svi(fits, num_draws=100)"),
    ],
    "user-svi": [("range(500)", "range(20)")],
    "user-nuts": [
        ("num_samples=50, warmup_steps=50", "num_samples=10, warmup_steps=10"),
        ("max_tree_depth=4", "max_tree_depth=2"),
    ],
}


def recipes(text: str | None = None) -> dict[str, str]:
    """NAME -> code of the page's marked blocks (each name once)."""
    text = DOC.read_text() if text is None else text
    found = RECIPE.findall(text)
    names = [name for name, _ in found]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"docs/prior.md: recipes named twice: {duplicated}")
    return {name: code for name, code in found}


def shrunk(name: str, code: str) -> str:
    for old, new in SHRINK.get(name, []):
        assert old in code, f"recipe {name!r} no longer contains {old!r}: update SHRINK"
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The shared namespace and the recipes already run in it."""
    return {"namespace": {"RECIPE_ROOT": str(tmp_path_factory.mktemp("recipes"))}, "done": set()}


def run(session, name: str) -> dict:
    for needed in DEPENDS[name]:
        if needed not in session["done"]:
            run(session, needed)
    code = shrunk(name, recipes()[name])
    exec(compile(code, f"docs/prior.md recipe {name}", "exec"), session["namespace"])
    session["done"].add(name)
    return session["namespace"]


def test_the_page_has_the_recipes_and_the_sizes_to_shrink():
    found = recipes()
    assert list(found) == list(DEPENDS)
    for name, code in found.items():
        shrunk(name, code)  # every replacement finds its text
    # the parser reads marked blocks only, and refuses a name used twice
    text = "```python\n# recipe: a\nx = 1\n```\n```python\ny = 2\n```\n"
    assert recipes(text) == {"a": "x = 1\n"}
    with pytest.raises(ValueError, match="twice"):
        recipes(text + "```python\n# recipe: a\nz = 3\n```\n")


def test_recipe_setup(session):
    ns = run(session, "setup")
    assert tuple(ns["diffusion"].event_shape) == (2,) and ns["diffusion"].num_steps == 20
    assert ns["observation"].num_observations == 1 and ns["exact"].shape == (400, 2)
    assert torch.isfinite(ns["mixture"].log_prob(ns["exact"])).all()


def test_recipe_smc(session):
    ns = run(session, "smc")
    assert ns["smc"].method == "twisted_smc" and ns["draws"].shape == (400, 2)
    assert math.isfinite(ns["smc"].diagnostics["log_evidence"])


def test_recipe_smc_dense(session):
    ns = run(session, "smc-dense")
    result = ns["smc_dense"]
    assert (
        result.diagnostics["proposal"] == "gaussian" and result.diagnostics["twist_covariance"] == "projected"
    )
    assert result.network_calls == 20 and 1 <= result.ess <= 200
    assert math.isfinite(result.diagnostics["log_evidence"])


def test_recipe_nuts(session):
    ns = run(session, "nuts")
    assert ns["nuts"].num_chains == 2 and ns["nuts"].draws.shape == (20, 2) and ns["nuts"].num_steps == 10


def test_recipe_svi(session):
    ns = run(session, "svi")
    assert len(ns["svi"].diagnostics["losses"]) == 20 and ns["svi"].num_steps == 10


def test_recipe_heuristics_and_compare(session):
    ns = run(session, "compare")
    assert ns["replacement"].draws.shape == ns["dps"].draws.shape == (400, 2)
    # replacement pastes y into the observed coordinate
    assert torch.allclose(ns["replacement"].draws[:, 0], torch.tensor(1.0))


def test_recipe_arviz_runs(session):
    import arviz as az

    ns = run(session, "arviz-runs")
    idata = ns["idata"]
    assert idata.posterior["x0"].shape == (4, 100, 2)
    assert idata.smc_diagnostics["log_evidence"].shape == (4,)
    summary = az.summary(idata)
    assert np.isfinite(summary["r_hat"].values).all()


def test_recipe_user_svi(session):
    ns = run(session, "user-svi")
    assert len(ns["losses"]) == 20 and all(math.isfinite(v) for v in ns["losses"])
    # the frozen prior: the diffusion's weights are not in the param store
    import pyro

    assert set(pyro.get_param_store().keys()) == {"sigma_loc", "sigma_scale", "x_loc", "x_scale"}


def test_recipe_user_nuts(session):
    import arviz as az

    ns = run(session, "user-nuts")
    idata = ns["idata"]
    assert idata.posterior["x0"].shape == (2, 10, 2, 2) and idata.posterior["sigma"].shape == (2, 10)
    assert idata.log_likelihood["y"].shape == (2, 10, 2)
    assert list(idata.observed_data.data_vars) == ["y"]
    assert np.isfinite(az.summary(idata, var_names=["sigma"])["r_hat"].values).all()
