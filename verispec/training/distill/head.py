"""`verispec distill --head`: train a draft head (`verispec/models/head.py`) for a verifier.

The data is distillation's own (`teacher.py`): each training prompt with the verifier's greedy
continuation. One more verifier pass per sequence gives its features (final hidden states, normed)
and its greedy choice at every position; the head learns, at position t, from [embedding of token
t+1, feature t], to predict feature t+1 (smooth L1) and the verifier's greedy token after it
(cross-entropy over the draft vocabulary).

Drafting past its first token, a head reads its own predicted features, not the verifier's. So
training unrolls it (EAGLE-3's training-time test): step j feeds step j-1's predictions, one
position earlier, and each step's rows attend as they would while drafting: to positions up to
where drafting began, fed with the verifier's features, and to the one row of each earlier step
on their own path (`HeadNet.forward`). Step j's agreement with the verifier is then what the
j-th draft token of a round gets.

The draft vocabulary is the `--head-vocab` tokens the verifier chooses most often over the
training data; its output layer starts from the verifier's own rows for those tokens.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from verispec.errors import UserError
from verispec.models.head import CONFIG, HEAD_TYPE, WEIGHTS
from verispec.models.reference import rotate
from verispec.training.loop import checkpoints, save_checkpoint

if TYPE_CHECKING:
    from verispec.models.lean import LeanLM
    from verispec.training.distill.command import DistillSettings
    from verispec.training.distill.teacher import Example

IGNORE = -100  # a label outside the draft vocabulary: no cross-entropy there


class HeadLayer(nn.Module):
    """A Llama decoder layer whose attention also takes the keys of earlier unrolled steps."""

    def __init__(self, D: int, H: int, Hkv: int, hd: int, ffn: int, eps: float):
        super().__init__()
        self.H, self.Hkv, self.hd, self.eps = H, Hkv, hd, eps
        self.input_layernorm = nn.Parameter(torch.ones(D))
        self.q_proj = nn.Linear(D, H * hd, bias=False)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=False)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        self.post_attention_layernorm = nn.Parameter(torch.ones(D))
        self.gate_proj = nn.Linear(D, ffn, bias=False)
        self.up_proj = nn.Linear(D, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, D, bias=False)

    def forward(self, x, cos, sin, earlier: list) -> tuple[torch.Tensor, tuple]:
        """x (B, T, D) of unrolled step j = len(earlier) + 1; `earlier`: steps 1..j-1's (k, v),
        each (B, Hkv, T, hd). Row t attends to step 1's positions up to t - (j - 1) and to step
        i's row t - (j - i), for i = 2..j (this step's own row included)."""
        B, T, _ = x.shape
        h = F.rms_norm(x, (x.shape[-1],), self.input_layernorm, self.eps)
        q = rotate(self.q_proj(h).view(B, T, self.H, self.hd).transpose(1, 2), cos, sin)
        k = rotate(self.k_proj(h).view(B, T, self.Hkv, self.hd).transpose(1, 2), cos, sin)
        v = self.v_proj(h).view(B, T, self.Hkv, self.hd).transpose(1, 2)
        steps = [*earlier, (k, v)]
        j = len(steps)
        group = self.H // self.Hkv
        k1, v1 = (t.repeat_interleave(group, dim=1) for t in steps[0])  # (B, H, T, hd)
        scores = q @ k1.transpose(-1, -2) * self.hd**-0.5  # (B, H, T, T)
        rows = torch.arange(T)
        allowed = rows[None, :] <= rows[:, None] - (j - 1)  # key s <= t - (j - 1)
        scores = scores.masked_fill(~allowed, float("-inf"))
        diagonal, values = [], []
        for i in range(2, j + 1):  # step i's row t - (j - i): shifted down by j - i
            ki, vi = (t.repeat_interleave(group, dim=1) for t in steps[i - 1])
            shift = j - i
            ki = F.pad(ki, (0, 0, shift, 0))[:, :, :T]
            vi = F.pad(vi, (0, 0, shift, 0))[:, :, :T]
            score = (q * ki).sum(-1, keepdim=True) * self.hd**-0.5  # (B, H, T, 1)
            diagonal.append(score.masked_fill(rows[:, None] < shift, float("-inf")))
            values.append(vi)
        weights = torch.softmax(torch.cat([scores, *diagonal], dim=-1), dim=-1)
        # A row with no allowed key at all (t < j - 1) is not trained on; keep its output finite.
        weights = torch.nan_to_num(weights)
        out = weights[..., :T] @ v1
        for n, vi in enumerate(values):
            out = out + weights[..., T + n : T + n + 1] * vi
        x = x + self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.hd))
        h = F.rms_norm(x, (x.shape[-1],), self.post_attention_layernorm, self.eps)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return x, (k, v)


class HeadNet(nn.Module):
    """The head as it trains: fc over [embedding, feature], the layers, the final norm and the
    draft-vocabulary output layer (`models/head.py` runs the same weights on the kernels). With
    `fuse_width`, the verifier's features are [streams after three layers, final feature] and a
    linear layer `fuse` makes the head's feature of them (`--head-fuse`)."""

    def __init__(self, D, H, Hkv, hd, ffn, layers, eps, draft_vocab, fuse_width: int | None = None):
        super().__init__()
        self.eps = eps
        self.fuse = nn.Linear(fuse_width, D, bias=False) if fuse_width else None
        self.fc = nn.Linear(2 * D, D, bias=False)
        self.layers = nn.ModuleList(HeadLayer(D, H, Hkv, hd, ffn, eps) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(D))
        self.lm_head = nn.Linear(D, draft_vocab, bias=False)

    def forward(self, embedded, features, cos, sin, unroll: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """embedded (B, T, D): token t+1's embedding at row t; features (B, T, D), or (B, T,
        fuse_width) with `fuse`: the verifier's feature t. Per unrolled step, the predicted features (B, T, D) and draft logits (B, T, Vd):
        step j's row t is the j-th draft of a round whose verified context ends at token t - j + 2."""
        outputs = []
        earlier: list[list] = [[] for _ in self.layers]
        fed = features if self.fuse is None else self.fuse(features)
        for _ in range(unroll):
            x = self.fc(torch.cat([embedded, fed], dim=-1))
            for n, layer in enumerate(self.layers):
                x, kv = layer(x, cos, sin, earlier[n])
                earlier[n].append(kv)
            h = F.rms_norm(x, (x.shape[-1],), self.norm, self.eps)
            outputs.append((h, self.lm_head(h)))
            fed = F.pad(h, (0, 0, 1, 0))[:, :-1]  # row t reads the prediction made at row t - 1
        return outputs


def verifier_features(lm: LeanLM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The verifier's features (T, D) float16 and greedy choices (T,) at every position of `ids`,
    from one pass as the engine runs it."""
    from verispec.models.reference import ContiguousCache, reference_forward

    tokens = torch.tensor(ids, dtype=torch.long)
    session = lm.session(capacity=len(ids))
    with torch.inference_mode():
        if lm.kernel_step:
            attention = lm._session_attention(session)
            attention.start = 0
            logits, hidden = lm.kernel_pass(tokens, attention, slice(None), features=True)
        else:
            cache = ContiguousCache(lm, session.keys, session.values, 0, len(ids))
            logits, hidden = reference_forward(lm, tokens, cache, slice(None), features=True)
    return hidden.to(torch.float16), logits.argmax(-1).to(torch.int32)


def lm_head_rows(lm: LeanLM, tokens: torch.Tensor) -> torch.Tensor:
    """The verifier's output-layer rows (n, D) for `tokens`, in float32, whatever form its head runs
    in: the head applied to the identity gives its weights exactly (one product per sum)."""
    with torch.inference_mode():
        eye = torch.eye(lm.embed.shape[1])
        return lm.lm_head(eye).float().t()[tokens].clone()


def head_config(
    lm: LeanLM, target: str, layers: int, draft_vocab: int, ffn: int, feature_layers: list[int] | None = None
) -> dict:
    """config.json of a head for the verifier `lm`, loaded from `target`; `feature_layers`: the
    verifier layers whose streams it fuses (`--head-fuse`)."""
    from verispec.models.loading import weights_digest

    config = lm.config
    rope = getattr(config, "rope_parameters", None) or {}
    return {
        "model_type": HEAD_TYPE,
        "hidden_size": lm.embed.shape[1],
        "num_attention_heads": lm.heads,
        "num_key_value_heads": lm.kv_heads,
        "head_dim": lm.head_dim,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "rms_norm_eps": lm.eps,
        "rope_theta": rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)),
        "vocab_size": lm.vocab_size,
        "draft_vocab_size": draft_vocab,
        "target": {"name": target, "digest": weights_digest(target)},
        **({"feature_layers": feature_layers} if feature_layers else {}),
    }


def save_head(net: HeadNet, d2t: torch.Tensor, config: dict, folder: Path, dtype: str) -> None:
    """The head's folder (`models/head.py` reads it): config.json and model.safetensors."""
    import shutil

    from safetensors.torch import save_file

    store = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    weights = {"fc.weight": net.fc.weight, "norm.weight": net.norm, "lm_head.weight": net.lm_head.weight}
    if net.fuse is not None:
        weights["fuse.weight"] = net.fuse.weight
    for i, layer in enumerate(net.layers):
        p = f"layers.{i}."
        weights[p + "input_layernorm.weight"] = layer.input_layernorm
        weights[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weights[f"{p}self_attn.{name}.weight"] = getattr(layer, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            weights[f"{p}mlp.{name}.weight"] = getattr(layer, name).weight
    tensors = {k: v.detach().to(store).contiguous() for k, v in weights.items()}
    tensors["d2t"] = d2t.to(torch.int64).contiguous()
    save_file(tensors, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    for file in folder.iterdir():
        file.chmod(0o644)


class Sequences:
    """The training sequences: per sequence its tokens, the verifier's features and greedy choices."""

    def __init__(self, lm: LeanLM, examples: list[Example], log: Callable[[str], None]):
        from tqdm import tqdm

        self.ids, self.features, self.labels = [], [], []
        started = time.perf_counter()
        for example in tqdm(examples, desc="verifier features", unit="seq", file=sys.stderr):
            ids = example.ids.tolist()
            features, labels = verifier_features(lm, ids)
            self.ids.append(torch.tensor(ids, dtype=torch.long))
            self.features.append(features)
            self.labels.append(labels)
        self.seconds = time.perf_counter() - started
        log(
            f"verifier features of {len(examples)} sequences, {sum(map(len, self.ids))} positions, in {self.seconds:.0f}s"
        )

    def vocabulary(self, size: int, vocab: int) -> torch.Tensor:
        """The `size` tokens the verifier chooses most often (ties to the lower id), sorted by id."""
        counts = torch.bincount(torch.cat(self.labels).long(), minlength=vocab)
        order = sorted(range(vocab), key=lambda t: (-int(counts[t]), t))
        return torch.tensor(sorted(order[: min(size, vocab)]), dtype=torch.long)

    def batch(self, picks: list[int], seq_len: int, generator: torch.Generator, embed, t2d):
        """Windows of at most seq_len + 1 positions, padded: inputs (B, T, D) x2, targets, a mask."""
        windows = []
        for i in picks:
            n = len(self.ids[i])
            start = int(torch.randint(0, max(n - seq_len - 1, 0) + 1, (1,), generator=generator))
            windows.append((i, start, min(n, start + seq_len + 1)))
        T = max(end - start for _, start, end in windows) - 1
        B, D = len(windows), embed.shape[1]
        embedded = torch.zeros(B, T, D)
        features = torch.zeros(B, T, self.features[0].shape[1])  # with --head-fuse: streams, then the final feature
        target = torch.zeros(B, T, D)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        positions = torch.zeros(B, dtype=torch.long)
        for b, (i, start, end) in enumerate(windows):
            n = end - start - 1  # rows: positions start..end-2 read token t+1 and predict feature t+1
            ids, feats = self.ids[i][start:end], self.features[i][start:end].float()
            embedded[b, :n] = embed[ids[1:]]
            features[b, :n] = feats[:-1]
            target[b, :n] = feats[1:, -D:]
            labels[b, :n] = t2d[self.labels[i][start + 1 : end].long()]
            positions[b] = start
        return embedded, features, target, labels, positions


def train_head(
    settings: DistillSettings,
    lm: LeanLM,
    examples: list[Example],
    evaluation: list[tuple[list[int], list[int]]],
    log: Callable[[str], None],
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train a head on `examples`, save it as out/final, and measure it on `evaluation` (prompt and
    verifier continuation pairs): the report's "training" and "after" parts."""
    from tqdm import tqdm

    D, vocab = lm.embed.shape[1], lm.vocab_size
    feature_layers = None
    if settings.head_fuse:
        from verispec.models.eagle3 import default_layers

        feature_layers = default_layers(len(lm.layers))
        if len(set(feature_layers)) < 3 or feature_layers[0] >= len(lm.layers) - 1:
            raise UserError(f"--head-fuse reads layers {feature_layers} of {len(lm.layers)}: the verifier needs at least 7")
        lm.tap(feature_layers)  # its passes now also give those streams
    data = Sequences(lm, examples, log)
    d2t = data.vocabulary(settings.head_vocab, vocab)
    t2d = torch.full((vocab,), IGNORE, dtype=torch.long)
    t2d[d2t] = torch.arange(len(d2t))
    covered = float((t2d[torch.cat(data.labels).long()] != IGNORE).float().mean())
    log(f"draft vocabulary: {len(d2t)} of {vocab} tokens, covering {covered:.3f} of the verifier's choices")
    ffn = settings.head_ffn or lm.layers[0].down.in_features
    fuse_width = (len(feature_layers) + 1) * D if feature_layers else None
    net = HeadNet(D, lm.heads, lm.kv_heads, lm.head_dim, ffn, settings.head_layers, lm.eps, len(d2t), fuse_width)
    _initialise(net, lm, d2t)
    embed = lm.embed.float()
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = settings.warmup if settings.warmup is not None else max(1, settings.steps // 20)
    generator = torch.Generator().manual_seed(settings.seed)
    history: dict = {"loss": [], "agree": [], "tokens": 0, "wall_s": 0.0, "cpu_s": 0.0}
    first = 0
    if settings.resume and (resumed := _resume(settings, net, optimizer, generator, d2t, log)) is not None:
        first, history = resumed
    started, cpu0 = time.perf_counter(), time.process_time()
    spent, spent_cpu = history["wall_s"], history["cpu_s"]  # the time of the runs this one continues
    limit = 60 * settings.head_minutes if settings.head_minutes else math.inf
    bar = tqdm(range(first, settings.steps), initial=first, total=settings.steps, desc="head", unit="step", file=sys.stderr)
    for step in bar:
        # Cosine decay over whichever ends first, the steps or the time limit: a run cut by
        # --head-minutes still ends at a low learning rate.
        elapsed = spent + time.perf_counter() - started
        progress = max(step / settings.steps, elapsed / limit)
        lr = settings.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        picks = torch.randint(0, len(data.ids), (settings.batch_size,), generator=generator).tolist()
        embedded, features, target, labels, positions = data.batch(
            picks, settings.seq_len, generator, embed, t2d
        )
        loss, agree = _loss(net, lm, embedded, features, target, labels, positions, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), settings.clip)
        optimizer.step()
        history["loss"].append(float(loss.detach()))
        history["agree"].append(agree)
        history["tokens"] += int((labels != IGNORE).sum())
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", agree=f"{agree:.3f}")
        history["wall_s"] = spent + time.perf_counter() - started
        history["cpu_s"] = spent_cpu + time.process_time() - cpu0
        over = history["wall_s"] > limit
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps or over:
            save_checkpoint(settings.out, step + 1, net, optimizer, history, extra={"generator": generator.get_state(), "d2t": d2t})
        if on_step is not None:
            on_step(step)
        if over:
            log(
                f"--head-minutes {settings.head_minutes:g} reached after {step + 1} of {settings.steps} steps"
            )
            break
    bar.close()
    config = head_config(lm, settings.target, settings.head_layers, len(d2t), ffn, feature_layers)
    final = settings.out / "final"
    save_head(net, d2t, config, final, settings.save_dtype)
    report = {
        "final": str(final),
        "draft_vocab": len(d2t),
        "vocab_coverage": covered,
        "features_wall_s": data.seconds,
        "training": {
            "steps": len(history["loss"]),
            "tokens": history["tokens"],
            "positions": history["tokens"],
            "wall_s": history["wall_s"],
            "cpu_s": history["cpu_s"],
            "first_loss": sum(history["loss"][:10]) / max(len(history["loss"][:10]), 1),
            "last_loss": sum(history["loss"][-10:]) / max(len(history["loss"][-10:]), 1),
            "first_batch_agreement": sum(history["agree"][:10]) / max(len(history["agree"][:10]), 1),
            "last_batch_agreement": sum(history["agree"][-10:]) / max(len(history["agree"][-10:]), 1),
        },
    }
    if evaluation:
        report["after"] = head_agreement(net, lm, evaluation, t2d, settings.head_unroll)
    return report


def _resume(settings, net: HeadNet, optimizer, generator: torch.Generator, d2t: torch.Tensor, log):
    """Continue from the last checkpoint in --out, if any: the step to start from and the history.
    The batches are drawn from the saved generator, so the run trains on what an uninterrupted
    one would."""
    found = checkpoints(settings.out)
    if not found:
        return None
    state = torch.load(found[-1] / "trainer.pt", weights_only=False)
    if not torch.equal(state["d2t"], d2t):
        raise UserError(
            f"--resume: the draft vocabulary of the run in {settings.out} differs from this data's; "
            "give the same prompts and options or choose another --out"
        )
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    log(f"resuming from {found[-1]} (step {state['step']} of {settings.steps})")
    return state["step"], state["history"]


def _initialise(net: HeadNet, lm: LeanLM, d2t: torch.Tensor) -> None:
    """The output layer from the verifier's rows and final norm; fc passing the feature through,
    so that the untrained head starts as "the verifier's next token from its last feature"."""
    with torch.no_grad():
        net.lm_head.weight.copy_(lm_head_rows(lm, d2t))
        net.norm.copy_(lm.norm.float())
        D = lm.embed.shape[1]
        net.fc.weight.mul_(0.1)
        net.fc.weight[:, D:] += torch.eye(D)
        if net.fuse is not None:  # the final feature passed through, the other streams mixed in a little
            net.fuse.weight.mul_(0.1)
            net.fuse.weight[:, -D:] += torch.eye(D)
        for layer in net.layers:
            layer.o_proj.weight.mul_(0.1)
            layer.down_proj.weight.mul_(0.1)


def _rotary(lm: LeanLM, positions: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, T, hd) for rows at positions start.. of each window."""
    index = positions[:, None] + torch.arange(T)[None, :]
    index = index.clamp(max=lm.cos.shape[0] - 1)
    return lm.cos.float()[index][:, None], lm.sin.float()[index][:, None]


def _loss(net, lm, embedded, features, target, labels, positions, settings) -> tuple[torch.Tensor, float]:
    """Cross-entropy on the verifier's choice plus smooth L1 on its feature, over the unrolled
    steps (step j's rows from j - 1 on: the earlier ones have no path of that length)."""
    T = embedded.shape[1]
    cos, sin = _rotary(lm, positions, T)
    total, hits, counted = 0.0, 0, 0
    for j, (h, logits) in enumerate(net(embedded, features, cos, sin, settings.head_unroll)):
        valid = labels.clone()
        valid[:, :j] = IGNORE
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), valid.reshape(-1), ignore_index=IGNORE)
        rows = (valid != IGNORE).float()
        l1 = (F.smooth_l1_loss(h, target, reduction="none").mean(-1) * rows).sum() / rows.sum().clamp_min(1)
        total = total + ce + settings.feature_weight * l1
        if j == 0:
            hits = int(((logits.argmax(-1) == valid) & (valid != IGNORE)).sum())
            counted = int((valid != IGNORE).sum())
    return total / settings.head_unroll, hits / max(counted, 1)


def head_agreement(
    net: HeadNet, lm: LeanLM, pairs: list[tuple[list[int], list[int]]], t2d, unroll: int
) -> dict:
    """Teacher-forced agreement with the verifier along its own greedy continuations: per draft
    position j (1..unroll), the share of continuation positions where the head's j-th draft,
    drafting from the verified context j - 1 tokens back, is the verifier's token. Draft j is
    accepted in a round when drafts 1..j all agree, so the product of the first few bounds the
    tokens per verifier call."""
    net.eval()
    agreed = [0] * unroll
    total = [0] * unroll
    embed = lm.embed.float()
    with torch.no_grad():
        for prompt, continuation in pairs:
            ids = prompt + continuation[:-1]
            features, labels = verifier_features(lm, ids)
            tokens = torch.tensor(ids)
            n = len(ids) - 1
            cos, sin = _rotary(lm, torch.zeros(1, dtype=torch.long), n)
            outputs = net(embed[tokens[1:]][None], features[:-1].float()[None], cos, sin, unroll)
            for j, (_, logits) in enumerate(outputs):
                guess = logits[0].argmax(-1)
                # Row t drafts the token after position t + 1; continuation rows only, paths of length j.
                for t in range(max(len(prompt) - 2, j), n):
                    verifier = int(labels[t + 1])
                    agreed[j] += int(t2d[verifier] == guess[t])
                    total[j] += 1
    net.train()
    return {
        "agreement": agreed[0] / max(total[0], 1),
        "by_draft_position": [a / max(t, 1) for a, t in zip(agreed, total, strict=True)],
        "positions": total[0],
        "prompts": len(pairs),
    }
