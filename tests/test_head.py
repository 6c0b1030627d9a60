"""Draft heads: `verispec distill --head` trains one, the runtime (`models/head.py`) computes what
training computed, and speculation with it is exact: greedy output token-identical to
verifier-only at any depth, batch and prefix reuse; sampled output distributed as the target's."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import EOS, exact_at_depths, llama, random_prompts, run_together, save, write_prompts
from tests.serving import ServerProcess
from tests.test_sampling_distribution import (
    ALPHA,
    PARAMS,
    PROMPT,
    VOCAB,
    exact_two_token_distribution,
    goodness_of_fit,
)
from verispec.assemble import build_engine, build_proposers, resolve_models
from verispec.config import ModelSettings, SamplingParams, Settings
from verispec.core.goodput import PassCosts
from verispec.core.head_batch import HeadBatch
from verispec.core.kv_cache import BlockTable
from verispec.core.runner import Segment
from verispec.errors import UserError
from verispec.models import load_model
from verispec.models.head import DraftHead, is_head, load_head
from verispec.models.kernels import kernel_library
from verispec.training.distill import DistillSettings, distill
from verispec.training.distill.head import HeadNet, head_config, save_head

QUIET = lambda line: None  # noqa: E731
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def exact_models(tmp_path_factory) -> dict[str, str]:
    """A target whose weights 16 bits hold exactly (the CPU kernel step) and its draft."""
    from tests.test_batching import exact_pair

    return exact_pair(tmp_path_factory.mktemp("head-exact"), seed=11)


@pytest.fixture(scope="module")
def trained(exact_models, tmp_path_factory) -> dict:
    """A head trained by the product on the exact target's greedy continuations."""
    root = tmp_path_factory.mktemp("head")
    prompts = write_prompts(root / "prompts.jsonl", 24)
    settings = DistillSettings(
        target=exact_models["target"], head=True, out=root / "out", prompts=prompts, eval_prompts=prompts,
        eval_limit=4, steps=30, batch_size=8, seq_len=48, max_new_tokens=24, eval_new_tokens=24, lr=3e-3,
        head_vocab=48, head_unroll=2,
    )  # fmt: skip
    return distill(settings, log=QUIET)


def test_training_lowers_the_loss_and_saves_a_head_the_loader_recognises(trained, exact_models):
    t = trained["training"]
    assert t["steps"] == 30 and t["last_loss"] < 0.8 * t["first_loss"]
    after = trained["after"]
    assert after["prompts"] == 4 and len(after["by_draft_position"]) == 2
    final = Path(trained["final"])
    assert is_head(str(final)) and not is_head(exact_models["target"])
    config = json.loads((final / "config.json").read_text())
    target = load_model(exact_models["target"], CPU, torch.float32)
    assert (
        config["draft_vocab_size"] == trained["draft_vocab"] == 48
        and config["vocab_size"] == target.vocab_size
    )
    head = load_head(str(final), target)
    assert head.vocab_size == 48 and sorted(head.d2t.tolist()) == head.d2t.tolist()
    if kernel_library() is not None:
        assert head.kernel_step, head.path_report()
    written = json.loads((final.parent / "eval.json").read_text())
    assert written["after"]["by_draft_position"] == after["by_draft_position"]


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_the_runtime_head_drafts_what_the_trained_network_computes(exact_models, tmp_path, kernel):
    """Feeding a sequence and then its own predictions, the loaded head's features and logits are
    the training network's unrolled steps: step j's row t is the j-th draft after position t - j + 1.
    This is what makes training's agreement by draft position the runtime's."""
    if kernel and kernel_library() is None:
        pytest.skip("no compiled kernel here")
    target = load_model(exact_models["target"], CPU, torch.float32, cpu_kernel=kernel)
    D, unroll = target.embed.shape[1], 3
    torch.manual_seed(0)
    net = HeadNet(D, target.heads, target.kv_heads, target.head_dim, 96, 1, target.eps, 40)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.half().float())  # what the saved head holds
    d2t = torch.randperm(target.vocab_size)[:40].sort().values
    save_head(net, d2t, head_config(target, exact_models["target"], 1, 40, 96), tmp_path / "h", "float16")
    head = DraftHead(str(tmp_path / "h"), target)
    assert head.kernel_step == kernel

    tokens = torch.randint(1, target.vocab_size, (20,))
    features = torch.randn(20, D)
    cos, sin = target.cos[:19].float()[None, None], target.sin[:19].float()[None, None]
    with torch.no_grad():
        steps = net(target.embed[tokens[1:]][None], features[:-1][None], cos, sin, unroll)
    batch = HeadBatch(head, 64 << 20, 16)  # the head on the runner, as the engine drafts with it
    for t in (6, 12):  # verified context: positions 0..t; the chain drafts from row t
        table = BlockTable(batch.runner.pool)
        segment = Segment(tokens[1 : t + 1].tolist(), 0, table, logits=1, features=True, inputs=features[:t])
        for j in range(unroll):
            logits = batch.runner.forward([segment])[0][-1]
            row = t - 1 + j
            h, expected = steps[j][0][0, row], steps[j][1][0, row]
            torch.testing.assert_close(segment.hidden[-1], h, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(logits, expected, rtol=2e-3, atol=2e-3)
            # The next input: the token the chain would have drafted, here the sequence's own (as training feeds).
            token = tokens[t + 1 + j : t + 2 + j].tolist()
            segment = Segment(token, t + j, table, logits=1, features=True, inputs=segment.hidden[-1:])
        table.free()


def test_an_interrupted_run_resumes_to_the_head_an_uninterrupted_one_makes(exact_models, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12)
    common = dict(
        target=exact_models["target"], head=True, prompts=prompts, no_eval=True, steps=12, batch_size=4,
        seq_len=32, max_new_tokens=16, lr=3e-3, head_vocab=48, head_unroll=2, checkpoint_every=4,
    )  # fmt: skip
    whole = distill(DistillSettings(out=tmp_path / "whole", **common), log=QUIET)

    class Interrupted(Exception):
        pass

    def interrupt(step: int) -> None:
        if step + 1 == 6:  # past the checkpoint of step 4
            raise Interrupted

    with pytest.raises(Interrupted):
        distill(DistillSettings(out=tmp_path / "cut", **common), log=QUIET, on_step=interrupt)
    with pytest.raises(UserError, match="pass --resume"):
        distill(DistillSettings(out=tmp_path / "cut", **common), log=QUIET)
    with pytest.raises(UserError, match="lr differ"):
        distill(DistillSettings(out=tmp_path / "cut", resume=True, **(common | {"lr": 1e-3})), log=QUIET)
    said = []
    resumed = distill(DistillSettings(out=tmp_path / "cut", resume=True, **common), log=said.append)
    assert any("resuming from" in line and "(step 4 of 12)" in line for line in said), said
    assert resumed["training"]["steps"] == whole["training"]["steps"] == 12
    assert resumed["training"]["last_loss"] == whole["training"]["last_loss"]
    a, b = (load_file(Path(r["final"]) / "model.safetensors") for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_off_policy_a_head_trains_on_the_texts_own_positions_without_a_teacher_pass(exact_models, tmp_path):
    """--off-policy: the prompts' text, cut into --seq-len chunks, is the data; the head's one
    verifier pass per chunk gives its features and labels, so no teacher is built."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", 24)
    settings = DistillSettings(
        target=exact_models["target"], head=True, off_policy=True, out=tmp_path / "out", prompts=prompts,
        eval_prompts=prompts, eval_limit=4, steps=24, batch_size=4, seq_len=16, eval_new_tokens=16, lr=3e-3,
        head_vocab=48, head_unroll=2,
    )  # fmt: skip
    said: list[str] = []
    report = distill(settings, log=said.append)
    teacher = report["teacher"]
    assert teacher["mode"] == "text" and teacher["positions"] == 0 and not (tmp_path / "out" / "teacher").exists()
    chunks = teacher["examples"]
    assert chunks >= 12 and teacher["tokens"] == 16 * chunks
    assert any(f"verifier features of {chunks} sequences, {16 * chunks} positions" in line for line in said), said
    assert report["training"]["last_loss"] < 0.9 * report["training"]["first_loss"]
    assert len(report["after"]["by_draft_position"]) == 2


def test_a_fused_head_reads_three_layers_beside_the_final_feature(tmp_path):
    """--head-fuse: training taps the verifier's layers 1, N/2-1 and N-4, the saved head names
    them, the runtime fuses the same streams training read (so its drafts are training's), and
    speculation with it stays exact."""
    from tests.test_batching import _llama, exact16

    target_path = save(exact16(_llama(64, layers=8, seed=3, heads=2, kv_heads=1, hidden=64)), tmp_path / "t8", 64)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12)
    settings = DistillSettings(
        target=target_path, head=True, head_fuse=True, out=tmp_path / "out", prompts=prompts, no_eval=True,
        steps=6, batch_size=4, seq_len=32, max_new_tokens=16, lr=3e-3, head_vocab=48, head_unroll=2,
    )  # fmt: skip
    final = distill(settings, log=QUIET)["final"]
    assert json.loads((Path(final) / "config.json").read_text())["feature_layers"] == [1, 3, 4]
    target = load_model(target_path, CPU, torch.float32)
    head = load_head(final, target)
    assert head.fuse is not None and target.taps == (1, 3, 4)

    from verispec.training.distill.head import verifier_features

    tokens = random_prompts(1, 64, seed=9, min_len=12, max_len=12)[0]
    features, _ = verifier_features(target, tokens)  # (T, 4D): the three streams, then the final feature
    assert features.shape == (12, 4 * 64)
    stored = load_file(Path(final) / "model.safetensors")
    expected = features[:, : 3 * 64].float() @ stored["fuse.weight"].float()[:, : 3 * 64].T
    expected += features[:, 3 * 64 :].float() @ stored["fuse.weight"].float()[:, 3 * 64 :].T
    torch.testing.assert_close(head.read_features(features.float()), expected, rtol=2e-3, atol=2e-3)

    engine = build_engine(Settings(target=target_path, draft=final))
    engine.pin_costs(PassCosts(tuple(range(1, 10)), (1.0,) * 9, draft_s=0.01))
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    for prompt in random_prompts(4, 64, seed=2, min_len=2, max_len=20):
        reference = engine.generate(prompt, params, depth=0).token_ids
        out = engine.generate(prompt, params, depth=3)
        assert out.token_ids == reference and out.stats.proposed > 0
    with pytest.raises(UserError, match="the verifier needs at least 7"):
        distill(settings.model_copy(update={"target": four_layer_target(tmp_path), "out": tmp_path / "o2"}), log=QUIET)


def four_layer_target(root: Path) -> str:
    """A 4-layer verifier: too shallow for three distinct inner layers."""
    from tests.test_batching import _llama, exact16

    return save(exact16(_llama(64, layers=4, seed=4, heads=2, kv_heads=1, hidden=64)), root / "t4", 64)


@pytest.fixture(scope="module")
def head_settings(trained, exact_models) -> Settings:
    return Settings(target=exact_models["target"], draft=trained["final"])


def test_a_head_folder_as_draft_picks_the_head_proposer(head_settings):
    assert resolve_models(head_settings.part(ModelSettings)).proposer == "head"
    engine = build_engine(head_settings)
    assert engine.proposer.name.startswith("head:")


def test_greedy_output_is_the_verifiers_at_every_depth_and_in_a_batch(head_settings):
    engine = build_engine(head_settings)
    engine.pin_costs(PassCosts(tuple(range(1, 10)), (1.0,) * 9, draft_s=0.01))  # depth auto speculates
    prompts = random_prompts(6, 64, seed=40, min_len=2, max_len=30)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    reference = exact_at_depths(engine, prompts, params)
    # All six at once, in one engine's passes, sharing a prefix (the prefix cache holds the first's blocks).
    shared = prompts[0] + prompts[1]
    batch = [*prompts, shared]
    reference.append(engine.generate(shared, params, depth=0).token_ids)
    out, requests = run_together(engine, batch, params, depth=3)
    assert out == reference
    assert all(r.stats.proposer_failures == 0 for r in requests)


def test_a_bf16_verifier_takes_its_head_along_and_output_stays_exact(trained, exact_models):
    engine = build_engine(Settings(target=exact_models["target"], draft=trained["final"], activations="bf16"))
    assert engine.target.activations == "bf16" and engine.proposer.head.activations == "bf16"
    assert engine.proposer.head.kernel_step
    engine.pin_costs(PassCosts(tuple(range(1, 10)), (1.0,) * 9, draft_s=0.01))  # depth auto speculates
    prompts = random_prompts(4, 64, seed=41, min_len=2, max_len=30)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    reference = exact_at_depths(engine, prompts, params)
    out, _ = run_together(engine, prompts, params, depth=3)
    assert out == reference


def test_a_cached_prefix_comes_with_the_heads_features(head_settings):
    """The prefix cache keeps keys and values; the head's features of its blocks are kept beside
    them, so a head's request whose prompt was seen reuses its prefix, and drafts as it would have."""
    engine = build_engine(head_settings)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompt, tail = random_prompts(2, 64, seed=41, min_len=60, max_len=60)
    first = engine.generate(prompt, params, depth=3)
    again = engine.generate(prompt, params, depth=3)
    assert first.stats.cached_tokens == 0 and again.stats.cached_tokens == 48  # 3 of its 16-token blocks
    assert again.token_ids == first.token_ids == engine.generate(prompt, params, depth=0).token_ids
    # The same features, so the same drafts and the same rounds.
    assert (again.stats.depths, again.stats.accepted) == (first.stats.depths, first.stats.accepted)
    longer = prompt + tail[:10]  # the same prefix, then text of its own
    out = engine.generate(longer, params, depth=3)
    assert out.stats.cached_tokens == 48 and out.token_ids == engine.generate(longer, params, depth=0).token_ids
    # Without the kept features the head cannot take the cached blocks: it recomputes them.
    engine.drafting.batch(engine.proposer).kept.clear()
    assert engine.generate(prompt, params, depth=3).stats.cached_tokens == 0


def test_a_head_takes_a_prefix_that_other_proposers_read(head_settings):
    """With a head loaded, every request's features are kept beside its cached blocks, whatever
    its proposer: a head's request takes the blocks of a prefix a verifier-only request read, and
    drafts exactly as it would from its own reading. Without a head loaded nothing is kept."""
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompt, tail = random_prompts(2, 64, seed=44, min_len=60, max_len=60)
    longer = prompt + tail[:10]
    alone = build_engine(head_settings)
    fresh = alone.generate(longer, params, depth=3)  # nothing cached
    engine = build_engine(head_settings)
    engine.prepare([engine.proposer])  # as a server does: the head's batch is made at start
    plain = engine.generate(prompt, params, proposer=None)  # no proposer: verifier only
    assert plain.token_ids == alone.generate(prompt, params, depth=0).token_ids
    out = engine.generate(longer, params, depth=3)
    assert out.stats.cached_tokens == 48 and out.token_ids == fresh.token_ids
    assert (out.stats.depths, out.stats.accepted) == (fresh.stats.depths, fresh.stats.accepted)
    # A verifier-only request whose prompt was cached takes the kept features on, for the next.
    again = prompt + tail[10:40]
    engine.generate(again, params, proposer=None)
    assert engine.generate(again + [7], params, depth=3).stats.cached_tokens == 80
    assert all(not r.feature_logs for r in engine.running + engine.waiting)
    unloaded = build_engine(head_settings)  # no head request yet, nothing prepared: no head batch
    unloaded.generate(prompt, params, proposer=None)
    assert not unloaded.drafting.heads()


def test_kept_features_go_once_their_blocks_are_evicted():
    """The features kept beside the prefix cache stay bounded by it: once they outnumber its blocks
    by a quarter, those whose blocks the pool no longer holds go; recall stops at the first gap."""
    from types import SimpleNamespace

    from verispec.core.kv_cache import BlockPool

    pool = BlockPool(4, 2)
    keys = [bytes([i]) * 16 for i in range(8)]
    pool.register(0, keys[0])
    pool.register(1, keys[1])
    batch = HeadBatch.__new__(HeadBatch)
    batch.kept = {}
    state = SimpleNamespace(remembered=0, known=16, features=torch.arange(16.0)[:, None].repeat(1, 3))
    batch.remember(state, keys[:5], pool)
    assert len(batch.kept) == 5 and state.remembered == 5  # 5 = 4 blocks and a quarter: none go yet
    batch.remember(state, keys, pool)
    assert set(batch.kept) == {keys[0], keys[1]} and state.remembered == 8
    assert torch.equal(torch.cat(batch.recall(keys)), state.features[:4])
    assert batch.recall([keys[2], keys[1]]) == []  # it stops at the first block not kept


def test_preempted_head_requests_come_back_with_their_features(head_settings):
    """A cache too small for every running request: the newest are preempted; taking back their
    cached blocks, they take back the head's features of them too, and every output is the
    verifier's."""
    alone_engine = build_engine(head_settings)
    lm = alone_engine.target
    per_block = 2 * len(lm.layers) * lm.kv_heads * 16 * lm.head_dim * 4
    prompts = random_prompts(6, 64, seed=43, min_len=150, max_len=250)
    params = SamplingParams(max_new_tokens=150, ignore_eos=True)
    alone = [alone_engine.generate(p, params, depth=0).token_ids for p in prompts]
    tight = build_engine(
        Settings(target=head_settings.target, draft=head_settings.draft, kv_cache_memory=str(per_block * (1024 // 16 + 1)), max_running=6)
    )
    out, requests = run_together(tight, prompts, params, depth=3)
    assert out == alone
    assert tight.preemptions > 0 and tight.runner.pool.hits > 0
    assert all(r.stats.proposer_failures == 0 for r in requests)


def head_from(target_path: str, folder: Path, scale: float) -> str:
    """An untrained head for the target, its output layer scaled by `scale` (peaked drafts: often
    accepted, often not), saved where the loader finds it; its path."""
    target = load_model(target_path, CPU, torch.float32)
    torch.manual_seed(1)
    D, vocab = target.embed.shape[1], target.vocab_size
    net = HeadNet(D, target.heads, target.kv_heads, target.head_dim, 2 * D, 1, target.eps, vocab)
    with torch.no_grad():
        net.lm_head.weight.mul_(scale)
    save_head(net, torch.arange(vocab), head_config(target, target_path, 1, vocab, 2 * D), folder, "float16")
    return str(folder)


def test_sampled_output_is_distributed_as_the_targets(tmp_path):
    """The statistical test of `test_sampling_distribution.py`, drafting with a head."""
    target_path = save(llama(VOCAB, layers=2, seed=30, hidden=16), tmp_path / "target", VOCAB)
    engine = build_engine(Settings(target=target_path, draft=head_from(target_path, tmp_path / "head", 8.0)))
    engine.pin_costs(PassCosts(tuple(range(1, 10)), (1.0,) * 9, draft_s=0.01))
    engine.eos_ids = frozenset()  # token 0 is an ordinary token here: every sample has two tokens
    expected = exact_two_token_distribution(engine)
    n, outputs, proposed, accepted = 2500, [], 0, 0
    for seed in range(n):
        out = engine.generate(PROMPT, PARAMS.model_copy(update={"seed": seed}), depth=2)
        outputs.append(out.token_ids[0] * VOCAB + out.token_ids[1])
        proposed += out.stats.proposed
        accepted += out.stats.accepted
    assert proposed >= n and 0 < accepted < proposed
    assert goodness_of_fit(torch.tensor(outputs), expected) > ALPHA


def test_mistakes_are_clear_errors(head_settings, trained, exact_models, tiny_models):
    draft = trained["final"]
    with pytest.raises(UserError, match="is a draft head, not a draft model: use --proposer head"):
        resolve_models(ModelSettings(target=exact_models["target"], draft=draft, proposer="draft"))
    with pytest.raises(UserError, match="--proposer head needs a draft head"):
        resolve_models(
            ModelSettings(target=exact_models["target"], draft=exact_models["draft"], proposer="head")
        )
    with pytest.raises(UserError, match="made for another verifier"):
        build_engine(Settings(target=tiny_models["llama"], draft=draft))
    with pytest.raises(UserError, match="only the lean backend"):
        build_engine(Settings(target=exact_models["target"], draft=draft, backend="transformers"))
    with pytest.raises(UserError, match="only the batched scheduler"):
        build_engine(Settings(target=exact_models["target"], draft=draft, scheduler="interleaved"))
    with pytest.raises(UserError, match="--proposers head needs a draft head"):
        engine = build_engine(Settings(target=exact_models["target"], proposer="ngram"))
        build_proposers(
            engine, Settings(target=exact_models["target"], proposer="ngram", proposers=("ngram", "head"))
        )
    with pytest.raises(ValueError, match="leave out --draft"):
        DistillSettings(
            target=exact_models["target"], draft=exact_models["draft"], head=True, out="o", prompts="p"
        )


def test_the_head_is_a_per_request_choice_beside_others(head_settings, trained, exact_models):
    settings = Settings(
        target=exact_models["target"], draft=trained["final"], proposer="ngram", proposers=("ngram", "head")
    )
    engine = build_engine(settings)
    proposers = build_proposers(engine, settings)
    assert set(proposers) == {"ngram", "head"} and proposers["head"].name.startswith("head:")
    engine.prepare(list(proposers.values()))
    prompt = random_prompts(1, 64, seed=41, min_len=10, max_len=10)[0]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    expected = engine.generate(prompt, params, depth=0).token_ids
    out = engine.generate(prompt, params, depth=3, proposer=proposers["head"])
    assert out.token_ids == expected and out.stats.proposed > 0
    # A new head on probation: the canary is a head too.
    canary = settings.model_copy(update={"canary_draft": trained["final"]})
    assert build_proposers(engine, canary)["canary"].name == f"head:{trained['final']}"


def test_one_token_prompts_and_eos(head_settings):
    engine = build_engine(head_settings)
    for prompt in ([5], [EOS + 1, 7]):
        assert engine.generate(prompt, SamplingParams(max_new_tokens=12), depth=3).token_ids == (
            engine.generate(prompt, SamplingParams(max_new_tokens=12), depth=0).token_ids
        )


def test_bench_puts_the_head_beside_the_draft_model(trained, exact_models, tmp_path):
    from verispec.tools.bench import run_bench

    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    settings = Settings(target=exact_models["target"], draft=exact_models["draft"], max_new_tokens=16)
    assert (
        run_bench(settings, prompts, depths=["3"], out=tmp_path / "out", peers=False, head=trained["final"])
        == 0
    )
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert {"verispec draft depth=3", "verispec head depth=3"} <= set(rows)
    assert rows["verispec head depth=3"]["proposer"] == "head" and report["all_identical"]
    with pytest.raises(UserError, match="not a draft head"):
        run_bench(
            settings, prompts, depths=["3"], out=tmp_path / "o2", peers=False, head=exact_models["draft"]
        )


@pytest.fixture(scope="module")
def head_server(trained, exact_models, tmp_path_factory):
    proc = ServerProcess(
        [
            "--target",
            exact_models["target"],
            "--draft",
            trained["final"],
            "--proposers",
            "head,ngram",
            "--depth",
            "3",
        ],
        log_dir=tmp_path_factory.mktemp("logs"),
    ).wait_ready()
    yield proc
    proc.stop_gracefully()


def test_over_http_a_request_chooses_the_head(head_server):
    def complete(**extra) -> dict:
        body = {"model": "target", "prompt": "t4 t7 t10 t13 t16", "max_tokens": 16, "temperature": 0,
                "ignore_eos": True, "speculation_stats": True, **extra}  # fmt: skip
        response = httpx.post(head_server.url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    plain, drafted, lookup = complete(depth=0), complete(proposer="head"), complete(proposer="ngram")
    text = plain["choices"][0]["text"]
    assert drafted["choices"][0]["text"] == text == lookup["choices"][0]["text"]
    assert drafted["speculation_stats"]["proposer"] == "head" and drafted["speculation_stats"]["proposed"] > 0
    assert lookup["speculation_stats"]["proposer"] == "ngram"
    metrics = httpx.get(head_server.url + "/metrics", timeout=10).text
    assert 'proposer="head"' in metrics
