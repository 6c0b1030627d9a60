"""`verispec bench` on the tiny models: the shape of its results, exactness, its files."""

import json
import re
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.image import imread

from tests.conftest import run_verispec, write_prompts
from verispec.config import load_settings
from verispec.core.rounds import Completion
from verispec.errors import UserError
from verispec.stats import RequestStats
from verispec.tools import bench, check
from verispec.tools.bench import Configuration, Run, analytic_bound, parse_depths, round_cost, run_bench

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
    stats = RequestStats(rounds=2, accepted=accepted, recovered=recovered, proposed_by_position=proposed_by_position)
    assert analytic_bound(stats, 1.0) == pytest.approx(expected)
    assert analytic_bound(stats, 2.0) == pytest.approx(expected / 2)


def test_round_cost_is_a_ratio_of_medians():
    # A round of 2 s against a verifier-only step of 1 s; the one stalled verifier-only run moves nothing.
    runs = [RequestStats(rounds=2, propose_s=1.0, verify_s=3.0)] * 3
    baseline = [RequestStats(rounds=4, verify_s=4.0), RequestStats(rounds=4, verify_s=400.0), RequestStats(rounds=2, verify_s=2.0)]
    assert round_cost(runs, baseline) == pytest.approx(2.0)


# -- every printed ratio is the ratio of the figures printed beside it -------------------------------


def _number(cell: str) -> tuple[float, float]:
    """A printed figure ("12.3", "1.25x", "98%") and half its last printed digit: its rounding."""
    match = re.fullmatch(r"(-?\d+)(?:\.(\d+))?(x|%)?", cell.strip())
    assert match, f"not a printed figure: {cell!r}"
    value, half = float(match[1] + "." + (match[2] or "0")), 0.5 * 10.0 ** -len(match[2] or "")
    return (value / 100, half / 100) if match[3] == "%" else (value, half)


def assert_ratio(printed: str, numerator: str, denominator: str) -> None:
    """`printed` is numerator / denominator, all three as printed, within their rounding."""
    (r, dr), (a, da), (b, db) = _number(printed), _number(numerator), _number(denominator)
    low, high = (a - da) / (b + db), (a + da) / (b - db) if b > db else float("inf")  # "0.00x": any ratio
    assert low - dr <= r <= high + dr, f"{printed} printed beside {numerator} / {denominator} = {a / b:.4f}"


def markdown_table(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]
    header, *rows = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)
    return [dict(zip(header, row, strict=True)) for row in rows]


def assert_bench_ratios(rows: list[dict[str, str]], results: list[dict]) -> None:
    """The printed table and the JSON results, row by row: every ratio from its own figures."""
    base_row, base = rows[0], results[0]
    assert base["name"] == base_row["configuration"] == "verispec verifier-only"
    for row, r in zip(rows, results, strict=True):
        assert row["configuration"] == r["name"]
        assert_ratio(row["speedup"], row["tokens/s"], base_row["tokens/s"])
        assert r["speedup_vs_verifier_only"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"])
        if r["engine"] == "transformers":
            assert row["decode tokens/s"] == row["decode speedup"] == "-" and r["decode_tokens_per_s"] is None
            continue
        assert_ratio(row["decode speedup"], row["decode tokens/s"], base_row["decode tokens/s"])
        assert r["decode_speedup"] == pytest.approx(r["decode_tokens_per_s"] / base["decode_tokens_per_s"])
        if r["bound_speedup"] is not None:
            assert_ratio(row["of bound"], row["decode speedup"], row["bound"])
            assert r["fraction_of_bound"] == pytest.approx(r["decode_speedup"] / r["bound_speedup"])


def test_bench_prints_ratios_of_its_printed_figures(bench_out):
    report = json.loads((bench_out / "results.json").read_text())
    assert_bench_ratios(markdown_table((bench_out / "results.md").read_text()), report["results"])


def _run_stats(total_s: float, rounds: int = 100, drafts: int = 0, accepted: int = 0) -> RequestStats:
    """One request of 100 tokens; 0.01 s of prefill, the rest split 1:9 between propose and verify."""
    decode_s = total_s - 0.01
    return RequestStats(
        generated_tokens=100, rounds=rounds, proposed=rounds * drafts, accepted=accepted,
        recovered=rounds if drafts else 0, proposed_by_position=[rounds] * drafts,
        accepted_by_position=[accepted // drafts] * drafts if drafts else [],
        prefill_s=0.01, propose_s=0.1 * decode_s if drafts else 0.0, verify_s=(0.9 if drafts else 1.0) * decode_s,
        total_s=total_s,
    )


def test_one_stalled_run_moves_no_ratio(monkeypatch):
    """Issue 24, defect 7: one verifier-only run stalled by the machine (here 30 s instead of 1 s)
    made 'decode speedup' (from summed times) 10x while tokens/s (medians) gave 1.25x."""
    seconds = {"verifier-only": [1.0, 30.0, 1.0, 1.0], "draft": [0.8] * 4}

    def runner(kind: str, drafts: int):
        def run(ids: list[int], n: int) -> Run:
            return Run([7] * 100, _run_stats(seconds[kind][ids[0]], rounds=40 if drafts else 100, drafts=drafts, accepted=60 if drafts else 0))

        return run

    configs = [
        Configuration("verispec verifier-only", "verispec", "none", 0, runner("verifier-only", 0)),
        Configuration("verispec draft depth=4", "verispec", "draft", 4, runner("draft", 4)),
    ]
    # Wall clock: the engine's own time for its request, so the test owns every second.
    monkeypatch.setattr(bench, "_timed", lambda config, ids, n, cuda: (run := config.run(ids, n), run.stats.total_s))
    bench.measure(configs, [[0], [1], [2], [3]], n=100, repeats=1, cuda=False)
    results = [asdict(r) for r in bench.summarize(configs)]
    assert_bench_ratios(markdown_table(bench.markdown(bench.summarize(configs), 4, "test")), results)
    draft = results[1]
    assert draft["speedup_vs_verifier_only"] == pytest.approx(1.0 / 0.8)
    assert draft["decode_speedup"] == pytest.approx(0.99 / 0.79)  # the stalled run is one of four: not the median


class _FakeEngine:
    """Completions with given times: (prompt, depth) -> seconds for 100 tokens."""

    def __init__(self, seconds: dict[tuple[str, object], float]):
        self.seconds = seconds
        self.proposer = None
        self.target = SimpleNamespace(name="fake-target")
        self.tokenizer = SimpleNamespace(decode=lambda ids: "")

    def generate(self, prompt: str, params, depth=None) -> Completion:
        stats = RequestStats(generated_tokens=100, rounds=100, total_s=self.seconds.get((prompt, depth), 1.0))
        return Completion([7] * 100, "", "length", stats)


def rich_table(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith(("┃", "│"))]
    header, *rows = ([cell.strip() for cell in re.split("[┃│]", line)[1:-1]] for line in lines)
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_check_prints_ratios_of_its_printed_figures(monkeypatch, capsys, tmp_path):
    """Issue 24, defect 7: `verispec check --limit 2` printed the median of per-prompt ratios
    (the mean of two), 17.87x beside tokens/s that give 1.46x, after one stalled verifier-only run."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "a"}\n{"id": "b", "prompt": "b"}\n')
    # Prompt b's verifier-only run stalled: 50 s for 100 tokens instead of 1 s. Depth 2 takes 1/1.2 s.
    engine = _FakeEngine({("a", 0): 1.0, ("b", 0): 50.0, ("a", 2): 1 / 1.2, ("b", 2): 1 / 1.2})
    monkeypatch.setattr(check, "build_engine", lambda settings: engine)
    report = tmp_path / "check.json"
    assert check.run_check(load_settings({}), prompts, depths=["2"], report=report, sampled=False) == 0
    rows = rich_table(capsys.readouterr().out)
    base_row, row = rows
    tokens, speedup = (next(name for name in row if name.startswith(prefix)) for prefix in ("tokens/s", "speedup"))
    assert base_row[speedup] == "1.00x"
    assert_ratio(row[speedup], row[tokens], base_row[tokens])
    data = json.loads(report.read_text())
    depth = data["depths"][0]
    assert depth["speedup"] == pytest.approx(depth["median_tokens_per_s"] / data["verifier_only"]["median_tokens_per_s"])
    assert depth["speedup"] == pytest.approx(120 / 51)
