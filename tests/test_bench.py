"""`verispec bench` on the tiny models: the shape of its results, exactness, its files."""

import json

import numpy as np
import pytest
from matplotlib.image import imread

from tests.conftest import run_verispec, write_prompts
from verispec.config import load_settings
from verispec.errors import UserError
from verispec.stats import RequestStats
from verispec.tools.bench import analytic_bound, parse_depths, run_bench

REQUIRED = (
    "name", "engine", "proposer", "depth", "tokens_per_s", "speedup_vs_verifier_only",
    "acceptance_rate", "mean_accepted_tokens", "identical_to_verifier_only",
)


verispec = run_verispec


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", 3)


@pytest.fixture(scope="module")
def bench_out(tiny_models, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    settings = load_settings({"target": tiny_models["llama"], "draft": tiny_models["llama-draft"], "max_new_tokens": 8})
    assert run_bench(settings, prompts_file, depths=["1", "auto"], repeats=1, out=out) == 0
    return out


def test_results_json_has_every_configuration(bench_out):
    report = json.loads((bench_out / "results.json").read_text())
    results = report["results"]
    assert all(key in r for r in results for key in REQUIRED)
    names = [r["name"] for r in results]
    assert len(names) == len(set(names))
    assert {r["engine"] for r in results} == {"verispec", "transformers"}
    assert [r["depth"] for r in results if r["proposer"] == "draft" and r["engine"] == "verispec"] == [1, "auto"]
    assert {"transformers", "transformers assisted", "transformers prompt-lookup"} <= set(names)
    assert report["config"]["prompt_count"] == 3 and report["config"]["max_new_tokens"] == 8
    assert {"python", "torch", "transformers", "verispec"} <= set(report["versions"])
    assert "target_backend" in report["machine"]


def test_every_configuration_is_exact(bench_out):
    report = json.loads((bench_out / "results.json").read_text())
    assert report["all_identical"] is True  # tiny models in float32: no near-ties
    assert all(r["identical_to_verifier_only"] and r["identical_count"] == 3 for r in report["results"])


def test_rates_and_acceptance(bench_out):
    results = {r["name"]: r for r in json.loads((bench_out / "results.json").read_text())["results"]}
    assert results["verispec verifier-only"]["speedup_vs_verifier_only"] == 1.0
    assert results["verispec verifier-only"]["bound_speedup"] == pytest.approx(1.0)
    base = results["verispec verifier-only"]["tokens_per_s"]
    peers = {name: r["tokens_per_s"] for name, r in results.items() if r["engine"] == "transformers"}
    for r in results.values():
        assert r["tokens_per_s"] > 0
        # The ratios are the rates' own: a speedup is this row's rate over the baseline's, side by side.
        assert r["speedup_vs_verifier_only"] == pytest.approx(r["tokens_per_s"] / base)
        assert r["speedup_vs_peers"] == pytest.approx({name: r["tokens_per_s"] / rate for name, rate in peers.items()})
        if r["engine"] == "transformers":
            assert r["acceptance_rate"] is None and r["mean_accepted_tokens"] is None
        elif r["proposer"] == "draft":
            # Depth auto may judge drafting not worth it on random models and propose nothing (rate None).
            if r["depth"] != "auto" or r["acceptance_rate"] is not None:
                assert 0.0 <= r["acceptance_rate"] <= 1.0
            assert r["mean_accepted_tokens"] >= 1.0


def test_markdown_and_plot_are_written(bench_out):
    markdown = (bench_out / "results.md").read_text()
    assert "| configuration |" in markdown and "transformers assisted" in markdown and "Exactness:" in markdown
    image = imread(bench_out / "speedup_vs_depth.png")  # a real PNG, of a drawn figure
    assert image.shape[0] >= 200 and image.shape[1] >= 300
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 16  # lines and labels, not a blank canvas


def test_cli_bench_without_peers(tiny_models, prompts_file, tmp_path):
    result = verispec(
        "bench", "--target", tiny_models["llama"], "--draft", tiny_models["llama-draft"], "--prompts", str(prompts_file),
        "--max-new-tokens", "6", "--depths", "2", "--limit", "1", "--no-peers", "--out", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "verispec draft depth=2" in result.stdout
    engines = {r["engine"] for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert engines == {"verispec"}


@pytest.mark.parametrize("args, message", [(("--depths", "x"), "--depths"), (("--depths", ","), "--depths"),
                                           (("--repeats", "0"), "--repeats")])
def test_cli_bench_user_errors(tiny_models, prompts_file, tmp_path, args, message):
    result = verispec("bench", "--target", tiny_models["llama"], "--prompts", str(prompts_file), "--out", str(tmp_path), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_parse_depths_drops_zero_and_duplicates():
    assert parse_depths(["0", "2", "auto", "2"]) == [2, "auto"]
    with pytest.raises(UserError):
        parse_depths(["-1"])


@pytest.mark.parametrize(
    "accepted, recovered, proposed_by_position, expected",
    [
        (0, 0, [], 1.0),  # verifier-only: one token per verifier step
        (4, 0, [2, 2], 3.0),  # all accepted at k = 2: k + 1
        (2, 2, [2, 2], (1 - 0.5**3) / 0.5),  # a = 1/2, k = 2: the closed form
        (2, 2, [1, 1], 1 + 0.5 * 0.5 + 0.5 * 0.25),  # a = 1/2, one round of 2 drafts, one with none
    ],
)
def test_analytic_bound(accepted, recovered, proposed_by_position, expected):
    # Round cost equal to one verifier-only step, so the bound is E itself.
    stats = RequestStats(
        rounds=2, accepted=accepted, recovered=recovered, proposed_by_position=proposed_by_position, verify_s=2.0
    )
    baseline = RequestStats(rounds=4, verify_s=4.0)
    assert analytic_bound(stats, baseline) == pytest.approx(expected)
