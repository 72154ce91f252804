"""Exact posteriors in dimension 2-8 and the samplers that use them: the mixture denoiser and
posterior in closed form, MCGdiff, DDRM, replacement and DPS on Gaussian priors whose posterior
is known, the grid invariance of DPS's step per noise level, argument errors, the study's
quick run."""

import json
import math

import pytest
import torch
from inference_helpers import exact_conditional, gaussian_ddpm

from pyro_diffusion.inference import (
    DiagonalMixture,
    LinearObservation,
    MixtureDenoiser,
    ddrm_sample,
    dps_sample,
    mcgdiff,
    mixture_diffusion,
    mixture_posterior,
    mode_weight_error,
    nuts_conditional,
    random_problem,
    replacement_sample,
    sliced_wasserstein,
    svi_conditional,
)
from pyro_diffusion.inference.smc import resample

A_DENSE = torch.tensor([[0.6, 0.8]])
Y = torch.tensor([0.7])


def _gaussian_mixture(d=3):
    """One diagonal component: the prior is Gaussian, so everything is known exactly."""
    return DiagonalMixture(
        torch.ones(1), torch.linspace(-0.5, 0.5, d)[None], torch.linspace(0.4, 0.8, d)[None]
    )


def test_mixture_denoiser_is_the_posterior_mean_of_the_noised_data():
    torch.manual_seed(0)
    mixture = random_problem(3, 1, 0.1, num_components=4, seed=2).mixture
    denoiser = MixtureDenoiser(mixture)
    gamma = torch.tensor(0.5, dtype=torch.float64)
    alpha, sigma = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
    # brute force: E[x | z] by self-normalized importance sampling from the prior
    x = mixture.sample(400000, torch.Generator().manual_seed(1))
    z = torch.tensor([[0.3, -0.2, 0.5], [-1.0, 0.4, 0.0]], dtype=torch.float64)
    log_w = -0.5 * ((z[:, None, :] - alpha * x[None]) ** 2).sum(-1) / sigma**2
    w = torch.softmax(log_w, -1)
    brute = w @ x
    exact = denoiser.posterior_mean(z, gamma.expand(2))
    assert torch.allclose(exact, brute, atol=0.02)
    # mixed levels in one batch give the per-level answers
    mixed = denoiser.posterior_mean(z, torch.tensor([0.5, -1.0], dtype=torch.float64))
    assert torch.allclose(mixed[0], exact[0])
    assert not torch.allclose(mixed[1], exact[1])


def test_mixture_posterior_matches_importance_sampling():
    problem = random_problem(4, 2, 0.3, num_components=5, seed=3)
    posterior = problem.posterior()
    x = problem.mixture.sample(100000, torch.Generator().manual_seed(0))
    A = problem.observation.matrix.double()
    log_w = -0.5 * ((problem.y.double() - x @ A.T) ** 2).sum(-1) / 0.3**2
    w = torch.softmax(log_w, -1)
    assert torch.allclose(posterior.mean, w @ x, atol=0.03)
    # the mode weights of exact draws are the posterior's, those of the prior are not
    draws = posterior.sample((4000,))
    assert mode_weight_error(posterior, draws) < 0.03
    prior = problem.mixture.sample(4000)
    assert mode_weight_error(posterior, prior) > 3 * mode_weight_error(posterior, draws)
    assert sliced_wasserstein(draws, posterior.sample((4000,))) < 0.5 * sliced_wasserstein(
        prior, posterior.sample((4000,))
    )


def test_mixture_posterior_refuses_a_mismatched_observation():
    mixture = _gaussian_mixture(3)
    with pytest.raises(ValueError, match="observation"):
        mixture_posterior(mixture, LinearObservation(A_DENSE, (2,), 0.1), Y)


@pytest.mark.parametrize("num_runs", [1, 3])
def test_mcgdiff_matches_the_exact_conditional_of_a_linear_chain(num_runs):
    diffusion = gaussian_ddpm(100, variance="small")
    observation = LinearObservation(A_DENSE, (2,), 0.1)
    mean, cov, log_evidence = exact_conditional(diffusion, observation, Y, num_steps=20)
    result = mcgdiff(
        diffusion, observation, Y, num_particles=6000 // num_runs, num_runs=num_runs, num_steps=20, seed=0
    )
    se = (cov.diag() / result.ess).sqrt()
    assert ((result.mean() - mean).abs() < 5 * se + 0.01).all()
    draws = result.draws.double()
    var = (result.weights[:, None] * (draws - result.mean()) ** 2).sum(0)
    assert torch.allclose(var, cov.diag(), rtol=0.15)
    assert abs(result.diagnostics["log_evidence"] - log_evidence) < 0.3
    assert result.diagnostics["log_evidence_runs"].shape == (num_runs,)
    assert result.diagnostics["run"].shape == (6000 // num_runs * num_runs,)
    assert result.network_calls == 20


def test_mcgdiff_is_right_on_a_mixture_in_eight_dimensions():
    problem = random_problem(8, 2, 0.2, num_components=6, seed=4)
    posterior = problem.posterior()
    diffusion = mixture_diffusion(problem.mixture)
    result = mcgdiff(diffusion, problem.observation, problem.y, num_particles=4000, num_steps=50, seed=0)
    reference = posterior.sample((2000,))
    sw = sliced_wasserstein(result.sample(1000), reference)
    ceiling = sliced_wasserstein(problem.mixture.sample(1000), reference)
    assert sw < 0.35 * ceiling


def test_ddrm_and_replacement_with_a_dense_matrix_land_near_the_gaussian_posterior():
    diffusion = mixture_diffusion(_gaussian_mixture(2))
    observation = LinearObservation(A_DENSE, (2,), 0.05)
    posterior = mixture_posterior(_gaussian_mixture(2), observation, Y)
    torch.manual_seed(0)
    for result in (
        ddrm_sample(diffusion, observation, Y, 4000, num_steps=50),
        replacement_sample(diffusion, observation, Y, 4000, num_steps=50),
    ):
        # neither is exact (the unobserved coordinates of the SVD basis are correlated with the
        # observed ones under this prior); both move most of the way from the prior's mean
        error = (result.draws.double().mean(0) - posterior.mean).norm()
        assert error < 0.15
        assert error < 0.25 * (_gaussian_mixture(2).means[0] - posterior.mean).norm()
        # the observed direction is pinned near y
        assert (result.draws.double() @ A_DENSE.double().T).std() < 0.15
    prior_std = (diffusion.sample(4000, num_steps=50).double() @ A_DENSE.double().T).std()
    assert prior_std > 0.4


def test_dps_step_per_level_does_not_depend_on_the_grid():
    diffusion = mixture_diffusion(_gaussian_mixture(2))
    observation = LinearObservation(A_DENSE, (2,), 0.1)
    torch.manual_seed(0)
    per_level = [
        dps_sample(diffusion, observation, Y, 3000, step_per_level=1.0, num_steps=K).draws.double().mean(0)
        for K in (50, 200)
    ]
    fixed = [
        dps_sample(diffusion, observation, Y, 3000, step_size=0.05, num_steps=K).draws.double().mean(0)
        for K in (50, 200)
    ]
    gap = (per_level[0] - per_level[1]).norm()
    assert gap < 0.05
    assert (fixed[0] - fixed[1]).norm() > 2 * gap


def test_resampling_schemes_keep_the_weights():
    torch.manual_seed(0)
    log_w = torch.tensor([0.0, math.log(3.0), -math.inf, math.log(4.0)], dtype=torch.float64)
    for scheme in ("systematic", "stratified", "multinomial"):
        index = torch.cat([resample(log_w, scheme) for _ in range(2000)])
        freq = torch.bincount(index, minlength=4).double() / index.numel()
        assert torch.allclose(freq, torch.tensor([0.125, 0.375, 0.0, 0.5], dtype=torch.float64), atol=0.02)


def test_bad_arguments_are_named():
    diffusion = gaussian_ddpm(100)
    observation = LinearObservation(A_DENSE, (2,), 0.1)
    with pytest.raises(ValueError, match="num_samples"):
        nuts_conditional(diffusion, observation, Y, num_samples=1, num_steps=5)
    with pytest.raises(ValueError, match="num_steps"):
        nuts_conditional(mixture_diffusion(_gaussian_mixture(2)), observation, Y)
    with pytest.raises(ValueError, match="lr"):
        svi_conditional(diffusion, observation, Y, lr=0.0, num_steps=5)
    with pytest.raises(ValueError, match="num_runs"):
        mcgdiff(diffusion, observation, Y, num_runs=0)
    with pytest.raises(ValueError, match="resampling"):
        mcgdiff(diffusion, observation, Y, resampling="residual")
    with pytest.raises(ValueError, match="eta"):
        ddrm_sample(diffusion, observation, Y, 10, eta=2.0)
    with pytest.raises(ValueError, match="step_per_level"):
        dps_sample(diffusion, observation, Y, 10, step_per_level=-1.0)


def test_the_quick_study_writes_only_under_out(tmp_path):
    from pyro_diffusion.experiments import posterior_study

    out = tmp_path / "posterior"
    posterior_study.main(["--quick", "--out", str(out), "--no-progress", "--num-problems", "1"])
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "table.md"]
    data = json.loads((out / "results.json").read_text())
    for cell in data["summary"]:
        methods = cell["methods"]
        assert methods["floor"]["sw"] < methods["ceiling"]["sw"]
        assert {"tds", "tds-av", "tds@256", "tds-av@256", "mcgdiff", "mcgdiff-av@256"} <= set(methods)
        # the evaluations reading admits only the methods within the budget on every problem
        strict = cell["readings"]["evaluations"]["best"]
        assert methods[strict]["max_evaluations"] <= cell["budget"]
        assert methods["tds-av@256"]["setup_evaluations"] == 200 * 20
        # counting the variance estimate too: within the budget with it
        counted = cell["readings"]["evaluations with setup"]["best"]
        assert methods[counted]["max_evaluations"] + methods[counted]["setup_evaluations"] <= cell["budget"]
    table = (out / "table.md").read_text()
    assert "exact (floor)" in table and "evaluations ≤ 1e5" in table


def test_the_study_selects_rows_and_cells_and_merges_them_into_a_saved_run(tmp_path):
    from pyro_diffusion.experiments import posterior_study

    out = tmp_path / "posterior"
    common = ["--quick", "--out", str(out), "--no-progress", "--num-problems", "1"]
    base = ["--cells", "8:4", "8:1", "--methods", "tds", "tds@256", "dps@1"]
    posterior_study.main(common + base)
    first = json.loads((out / "results.json").read_text())
    assert [(p["dim"], p["num_observations"]) for p in first["problems"]] == [(8, 4), (8, 1)]
    assert list(first["problems"][0]["methods"]) == ["floor", "ceiling", "tds", "tds@256", "dps@1"]
    added = ["tds-av@128x10", "mcgdiff-av@128x10"]
    posterior_study.main(common + ["--cells", "8:4", "--methods", *added, "--merge"])
    data = json.loads((out / "results.json").read_text())
    cell4, cell1 = data["problems"]
    # the same problem, floor and ceiling; the new rows only where they were run, on their grid
    assert cell4["methods"]["floor"] == first["problems"][0]["methods"]["floor"]
    assert set(added) <= set(cell4["methods"]) and not set(added) & set(cell1["methods"])
    for name in added:
        row = cell4["methods"][name]
        assert row["network_calls"] == 10 and row["evaluations"] == 1280 and row["num_steps"] == 10
        assert row["setup_evaluations"] == 200 * 10
    assert data["additions"][0]["methods"] == added and data["additions"][0]["cells"] == [[8, 4]]
    summary = {(s["dim"], s["num_observations"]): s for s in data["summary"]}
    assert summary[(8, 4)]["samplers"] == ["tds", "tds@256", "tds-av@128x10", "mcgdiff-av@128x10"]
    section = posterior_study.docs_section(
        posterior_study.StudyConfig(**data["config"]), data["summary"], 1.0, [], additions=data["additions"]
    )
    assert "`tds-av@128x10` 2000 (3280 per problem if counted)" in section
    # a cell the saved run lacks, a changed problem setting, unknown rows and cells are refused
    with pytest.raises(ValueError, match="merge"):
        posterior_study.main(common + ["--cells", "8:2", "--methods", "tds@64x5", "--merge"])
    with pytest.raises(ValueError, match="merge: seed"):
        posterior_study.merge_results(
            data, posterior_study.StudyConfig(**{**data["config"], "seed": 1}), [], {}
        )
    for bad in ("tds@0", "tds-avx", "dps@-1", "svi"):
        with pytest.raises(ValueError, match="methods"):
            posterior_study.main(common + ["--methods", bad])
    for bad in ("8", "4:8", "a:b"):
        with pytest.raises(ValueError, match="cells"):
            posterior_study.main(common + ["--cells", bad])


def test_the_study_runs_tempered_rows_and_refuses_bad_ones(tmp_path):
    from pyro_diffusion.experiments import posterior_study

    config = posterior_study.StudyConfig()
    spec = posterior_study.parse_method("tds-av-tadaptive0.9@2000x50", config)
    assert spec["variances"] and spec["particles"] == 2000 and spec["num_steps"] == 50
    assert spec["tempering"] == {"tempering": "adaptive", "tempering_ess": 0.9}
    assert posterior_study.parse_method("tds-tlinear", config)["tempering"] == {"tempering": "linear"}
    assert posterior_study.parse_method("tds-t2@1000", config)["tempering"] == {"tempering": 2.0}
    assert posterior_study.parse_method("tds@1000", config)["tempering"] is None
    for bad in ("mcgdiff-tlinear", "tds-tcubic", "tds-tadaptive1.5", "tds-t@10"):
        with pytest.raises(ValueError, match="^methods: "):
            posterior_study.parse_method(bad, config)
    out = tmp_path / "posterior"
    methods = ["tds-tadaptive0.99@128x10", "tds-t2@128x10"]
    posterior_study.main(
        [
            "--quick",
            "--out",
            str(out),
            "--no-progress",
            "--num-problems",
            "1",
            "--cells",
            "8:4",
            "--methods",
            *methods,
        ]
    )
    rows = json.loads((out / "results.json").read_text())["problems"][0]["methods"]
    for name in methods:
        assert rows[name]["network_calls"] == 10 and rows[name]["evaluations"] == 1280
        assert 0 <= rows[name]["noise_end_temperature"] <= 1 and 0 <= rows[name]["untempered_levels"] <= 10
    assert rows["tds-t2@128x10"]["noise_end_temperature"] == pytest.approx(0.01)
    assert rows["tds-t2@128x10"]["untempered_levels"] == 1


def test_the_study_runs_gaussian_proposal_rows_and_refuses_bad_ones(tmp_path):
    from pyro_diffusion.experiments import posterior_study

    config = posterior_study.StudyConfig()
    spec = posterior_study.parse_method("tds-av-an-proj-gauss@2000x50", config)
    assert (
        spec["variances"] and spec["analytic_twist"] and spec["particles"] == 2000 and spec["num_steps"] == 50
    )
    assert spec["proposal"] == "gaussian" and spec["twist_covariance"] == "projected"
    plain = posterior_study.parse_method("tds@1000", config)
    assert plain["proposal"] == "gradient" and plain["twist_covariance"] == "isotropic"
    assert plain["analytic_twist"] is None
    spec = posterior_study.parse_method("tds-av10-an-proj-gauss@1800x50", config)
    assert spec["variances"] and spec["variance_levels"] == 10 and spec["particles"] == 1800
    assert posterior_study.parse_method("tds-av@1000", config)["variance_levels"] is None
    for bad in (
        "tds-an-gauss",
        "mcgdiff-gauss",
        "mcgdiff-av-proj",
        "mcgdiff-av10",
        "tds-gauss-tlinear",
        "tds-gauss-proj",
        "tds-av0",
    ):
        with pytest.raises(ValueError, match="^methods: "):
            posterior_study.parse_method(bad, config)
    out = tmp_path / "posterior"
    methods = ["tds-proj-gauss@128x10", "tds-av-an-proj-gauss@128x10", "tds-av4-an-proj-gauss@128x10"]
    posterior_study.main(
        [
            "--quick",
            "--out",
            str(out),
            "--no-progress",
            "--num-problems",
            "1",
            "--cells",
            "8:4",
            "--methods",
            *methods,
        ]
    )
    rows = json.loads((out / "results.json").read_text())["problems"][0]["methods"]
    for name in methods:
        assert rows[name]["network_calls"] == 10 and rows[name]["evaluations"] == 1280
        assert rows[name]["sw"] > 0
    full, few = rows["tds-av-an-proj-gauss@128x10"], rows["tds-av4-an-proj-gauss@128x10"]
    assert full["setup_evaluations"] == 10 * few["setup_evaluations"] / 4 > 0


def test_another_stream_keeps_the_problems_and_redraws_the_samplers(tmp_path):
    from pyro_diffusion.experiments import posterior_study

    common = ["--quick", "--no-progress", "--num-problems", "1", "--cells", "8:4", "--methods", "tds@128x10"]
    rows = {}
    for stream in (0, 1):
        out = tmp_path / f"s{stream}"
        posterior_study.main([*common, "--out", str(out), "--stream", str(stream)])
        rows[stream] = json.loads((out / "results.json").read_text())["problems"][0]["methods"]
    assert rows[0]["floor"] == rows[1]["floor"] and rows[0]["ceiling"] == rows[1]["ceiling"]
    assert rows[0]["tds@128x10"]["sw"] != rows[1]["tds@128x10"]["sw"]
    with pytest.raises(SystemExit) as exit_info:
        posterior_study.main([*common, "--out", str(tmp_path / "bad"), "--stream", "-1"])
    assert exit_info.value.code == 2 and not (tmp_path / "bad").exists()
