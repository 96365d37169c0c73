"""Multi-token prediction: module shapes, the loss against a hand computation, gradients, checkpoints,
config errors, the trainer's MTP term, speculative self-drafting (greedy equals plain greedy; sampling
keeps the target distribution), and the presets built on it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import seqblocks  # noqa: F401  (registers the mixers)
from seqblocks.generation import _verify, generate
from seqblocks.models.config_lm import LanguageModel, LanguageModelConfig
from seqblocks.models.lrnn_lm import LRNNLMHeadModel
from seqblocks.models.model_config import ModelConfig
from seqblocks.models.mtp import mtp_loss
from seqblocks.presets import build_model, load_config
from seqblocks.testing import assert_close
from seqblocks.train import TrainConfig, train
from seqblocks.train.trainer import _mtp_loss_sum

KW = {"attn": {"num_heads": 2}, "mamba": {"expand": 1}, "mamba2": {"headdim": 16, "chunk_size": 8}}
PATTERNS = {"attention": ["attn", "attn"], "mamba": ["mamba", "mamba"], "hybrid": ["mamba2", "attn"]}


def lrnn(types, vocab_size=13, n_predict=2, **kw) -> LRNNLMHeadModel:
    return LRNNLMHeadModel(32, 8, len(types), vocab_size, list(types), d_intermediate=64, mixer_kwargs=KW,
                           mtp_n_predict=n_predict, **kw).eval()


def test_shapes_and_when_mtp_logits_are_computed():
    model = lrnn(["mamba", "attn"], n_predict=3)
    ids = torch.randint(0, 13, (2, 7))
    out = model(ids)
    assert out.logits.shape == (2, 7, 13)
    assert [t.shape for t in out.mtp_logits] == [(2, 6, 13), (2, 5, 13), (2, 4, 13)]
    # The main logits are those of the same model without MTP (MTP only adds modules).
    assert len(model.mtp) == 3 and all(len(list(m.parameters())) > 0 for m in model.mtp)
    short = model(ids[:, :2]).mtp_logits  # depths past the sequence give empty logits
    assert [t.shape[1] for t in short] == [1, 0, 0]
    assert model(ids, num_last_tokens=1).mtp_logits is None
    assert model(ids, inference_params=model.allocate_inference_cache(2, 7)).mtp_logits is None
    assert lrnn(["attn"], n_predict=0)(ids).mtp_logits is None


def test_mtp_logits_and_loss_equal_a_hand_computation():
    config = LanguageModelConfig.from_pattern(["mha", "mha"], vocab_size=11, d_model=32, mtp_n_predict=2,
                                              mtp_lambda=0.25)
    model = LanguageModel(config).eval()
    ids = torch.randint(0, 11, (2, 6))
    out = model(ids)
    # Depth 0 is the main model's final hidden; depth k reads depth k - 1 and the tokens k ahead.
    h = model._final_hidden(ids, None, None, None, None, {})
    assert_close(model.head_logits(h), out.logits, atol=1e-5)
    for k, module in enumerate(model.mtp, start=1):
        x = module.proj(torch.cat([module.hidden_norm(h[:, :-1]), module.embed_norm(model.embedding(ids[:, k:]))], -1))
        h = module.block(x)[0]
        logits = F.linear(module.out_norm(h), model.lm_head.weight)
        assert_close(logits, out.mtp_logits[k - 1], atol=1e-5)
    # The loss: targets[:, i] is the token after i; depth k at i is scored against targets[:, i + k].
    targets = torch.randint(0, 11, (2, 6))
    targets[0, 4] = -100
    per_depth = []
    for k, logits in enumerate(out.mtp_logits, start=1):
        terms = [-logits[b, i].log_softmax(-1)[targets[b, i + k]] for b in range(2) for i in range(6 - k)
                 if targets[b, i + k] != -100]
        per_depth.append(sum(terms) / len(terms))
    expected = 0.25 * (per_depth[0] + per_depth[1]) / 2
    assert_close(mtp_loss(out.mtp_logits, targets, 0.25), expected, atol=1e-5)


def test_mtp_loss_errors_and_all_ignored():
    logits = (torch.zeros(1, 3, 5),)
    with pytest.raises(ValueError, match="at least one depth"):
        mtp_loss((), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"depth 1 logits must be \[1, 4, V\]"):
        mtp_loss(logits, torch.zeros(1, 5, dtype=torch.long))
    assert float(mtp_loss(logits, torch.full((1, 4), -100))) == 0.0


@pytest.mark.parametrize("front", ["lrnn", "configurable"])
def test_gradients_reach_every_mtp_parameter_and_the_trunk(front):
    if front == "lrnn":
        model = lrnn(["mamba", "attn"]).train()
    else:
        model = LanguageModel(LanguageModelConfig.from_pattern(["mamba", "mha"], vocab_size=13, d_model=32,
                                                               mtp_n_predict=2)).train()
    ids = torch.randint(0, 13, (2, 8))
    loss = mtp_loss(model(ids).mtp_logits, torch.randint(0, 13, (2, 8)))
    loss.backward()
    for name, p in model.mtp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The MTP loss also trains the trunk (through h_0) and the shared embedding / head.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.layers[-1].parameters())
    assert model.embedding.weight.grad.abs().sum() > 0


def test_bf16_mtp_logits_and_fp32_loss():
    model = lrnn(["attn", "attn"]).to(torch.bfloat16)
    out = model(torch.randint(0, 13, (2, 6)))
    assert out.mtp_logits[0].dtype == torch.bfloat16
    loss = mtp_loss(out.mtp_logits, torch.randint(0, 13, (2, 6)))
    assert loss.dtype == torch.float32 and math.isfinite(float(loss.detach()))


def test_checkpoint_round_trip_keeps_mtp_modules(tmp_path):
    model = lrnn(["mamba", "attn"], mtp_lambda=0.5)
    model.save_pretrained(tmp_path)
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.config.mtp_n_predict == 2 and loaded.config.mtp_lambda == 0.5
    assert any(k.startswith("mtp.") for k in loaded.state_dict())
    ids = torch.randint(0, 13, (1, 6))
    for a, b in zip(model(ids).mtp_logits, loaded(ids).mtp_logits):
        assert torch.equal(a, b)
    lm = LanguageModel(LanguageModelConfig.from_pattern(["mha"], vocab_size=13, d_model=32, mtp_n_predict=1)).eval()
    lm.save_pretrained(tmp_path / "lm")
    back = LanguageModel.from_pretrained(tmp_path / "lm").eval()
    assert torch.equal(lm(ids).mtp_logits[0], back(ids).mtp_logits[0])


def test_configs_round_trip_and_reject_bad_mtp_fields():
    config = LanguageModelConfig.from_pattern(["mha"], vocab_size=13, mtp_n_predict=2, mtp_lambda=0.3)
    assert config.mtp_n_predict == 2 and config.blocks[0].attention == "mha"
    assert LanguageModelConfig.from_json(config.to_json()) == config
    model_config = ModelConfig.from_args(32, 4, 1, 13, ["attn"], mtp_n_predict=1, mtp_lambda=0.2)
    assert ModelConfig.from_json(model_config.to_json()) == model_config
    assert ModelConfig.from_data({"d_model": 32, "n_layer": 1, "vocab_size": 13, "mixer_types": ["attn"],
                                  "mtp_n_predict": 1}).mtp_n_predict == 1
    for bad, err in ((-1, ValueError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(err, match="mtp_n_predict"):
            LanguageModelConfig.from_pattern(["mha"], mtp_n_predict=bad)
        with pytest.raises(err, match="mtp_n_predict"):
            LRNNLMHeadModel(32, 4, 1, 13, ["attn"], mtp_n_predict=bad)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mtp_lambda"):
            ModelConfig.from_args(32, 4, 1, 13, ["attn"], mtp_lambda=bad)


def test_trainer_adds_the_weighted_mtp_loss(tmp_path):
    model = lrnn(["attn"], mtp_lambda=0.4)
    ids, targets = torch.randint(0, 13, (2, 6)), torch.randint(0, 13, (2, 6))
    targets[1, :2] = -100
    out = model(ids)
    assert_close(_mtp_loss_sum(out, targets, model), 0.4 * mtp_loss(out.mtp_logits, targets) * 10, atol=1e-5)
    assert _mtp_loss_sum(lrnn(["attn"], n_predict=0)(ids), targets, model) == 0.0
    tiny = {"d_model": 32, "d_state": 4, "n_layer": 1, "vocab_size": 0, "mixer_types": ["attn"],
            "d_intermediate": 32, "mixer_kwargs": {"attn": {"num_heads": 2}}, "mtp_n_predict": 2}
    config = TrainConfig(task="mqar", task_options={"vocab_size": 24, "num_kv_pairs": 2, "seq_len": 12,
                                                    "eval_examples": 16},
                         steps=3, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0, ckpt_every=0, log_every=1,
                         sample_tokens=0, device="cpu", eval_batch_size=16)
    torch.manual_seed(0)
    before = build_model(tiny, vocab_size=24).mtp.state_dict()
    result = train(tiny, config, tmp_path, progress=False, log=lambda m: None)
    after = result.model.mtp.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("proj.weight"))


# ---------------------------------------------------------------- speculative self-drafting


def _trained(types, vocab_size=16, steps=120) -> LRNNLMHeadModel:
    """A model whose main head and MTP depths have learned a fixed cycle of tokens, so drafts are
    mostly accepted (the random-weight models below mostly reject: both paths get exercised)."""
    torch.manual_seed(0)
    model = lrnn(types, vocab_size=vocab_size).train()
    cycle = torch.randperm(vocab_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        start = torch.randint(0, vocab_size, (16, 1))
        ids = cycle[(start + torch.arange(17)) % vocab_size]
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + mtp_loss(out.mtp_logits, ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("kind", list(PATTERNS))
def test_mtp_draft_greedy_equals_plain_greedy(kind):
    torch.manual_seed(1)
    random_model = lrnn(PATTERNS[kind])
    trained = _trained(PATTERNS[kind])
    for model, vocab in ((random_model, 13), (trained, 16)):
        prompt = torch.randint(0, vocab, (3, 5))
        plain = generate(model, prompt, 24, temperature=0, return_scores=True)
        drafted = generate(model, prompt, 24, temperature=0, mtp_draft=True, return_scores=True)
        assert torch.equal(drafted.tokens, plain.tokens) and torch.equal(drafted.sequences, plain.sequences)
        assert torch.equal(drafted.num_generated, plain.num_generated)
        assert_close(drafted.scores, plain.scores, atol=1e-4)
        assert 0.0 <= drafted.draft_acceptance <= 1.0 and plain.draft_acceptance is None
    assert drafted.draft_acceptance > 0.8  # the trained model's drafts are nearly always right


def test_mtp_draft_stop_tokens_callback_and_configurable_model():
    model = LanguageModel(LanguageModelConfig.from_pattern(["mamba", "mha"], vocab_size=13, d_model=32,
                                                           mtp_n_predict=2)).eval()
    prompt = torch.randint(0, 13, (2, 4))
    seen = []
    plain = generate(model, prompt, 16, temperature=0, stop_tokens=[3, 5],
                     callback=lambda t, a: seen.append((t.clone(), a.clone())))
    seen_draft = []
    drafted = generate(model, prompt, 16, temperature=0, stop_tokens=[3, 5], mtp_draft=True,
                       callback=lambda t, a: seen_draft.append((t.clone(), a.clone())))
    assert torch.equal(drafted.tokens, plain.tokens) and torch.equal(drafted.lengths, plain.lengths)
    steps = [(t, a) for t, a in seen if a.any()]
    assert len(seen_draft) == len(steps)
    for (t1, a1), (t2, a2) in zip(steps, seen_draft):
        assert torch.equal(a1, a2) and torch.equal(t1[a1], t2[a2])


def test_acceptance_rule_gives_the_target_distribution_exactly_in_law():
    """One verification step with fixed p and q: the emitted token is distributed as p (up to sampling
    noise), though the drafts come from q; always accepting the draft would give q."""
    gen = torch.Generator().manual_seed(0)
    V, R = 5, 200_000
    p_logits = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0])
    q_logits = torch.tensor([0.0, 2.0, 0.5, -1.0, 0.0])
    drafts = torch.multinomial(q_logits.softmax(-1), R, replacement=True, generator=gen)[:, None]
    target = torch.stack([p_logits, torch.zeros(V)])[None].expand(R, 2, V)
    accept, follow = _verify(target, drafts, q_logits[None, None].expand(R, 1, V), 1.0, gen)
    emitted = torch.where(accept[:, 0], drafts[:, 0], follow[:, 0])
    freq = torch.bincount(emitted, minlength=V).float() / R
    p = p_logits.softmax(-1)
    assert 0.5 * (freq - p).abs().sum() < 0.01
    assert 0.5 * (q_logits.softmax(-1) - p).abs().sum() > 0.3  # the check can tell q from p
    rate = float(accept.float().mean())
    assert abs(rate - float(torch.minimum(p, q_logits.softmax(-1)).sum())) < 0.01  # sum min(p, q)


@pytest.mark.parametrize("top_k", [None, 3])
def test_mtp_draft_sampling_matches_the_target_joint_distribution(top_k):
    """The first four sampled tokens over a 4-token vocabulary against the exact joint probabilities."""
    torch.manual_seed(0)
    V, N, R = 4, 4, 20_000
    model = LRNNLMHeadModel(16, 4, 1, V, ["attn"], mixer_kwargs=KW, mtp_n_predict=2,
                            pad_vocab_size_multiple=1).eval()
    with torch.no_grad():
        model.embedding.weight.mul_(12)  # peaked, non-uniform distributions
    prompt = torch.tensor([[1, 2, 0]])
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
    with torch.no_grad():
        logits = model(torch.cat([prompt.expand(len(seqs), -1), seqs], 1)[:, :-1]).logits[:, 2:]
        if top_k is not None:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        exact = logits.log_softmax(-1).gather(-1, seqs[..., None])[..., 0].sum(-1).exp()
    out = generate(model, prompt.expand(R, -1), N, seed=1, top_k=top_k, mtp_draft=True)
    index = (out.tokens * V ** torch.arange(N - 1, -1, -1)).sum(-1)
    freq = torch.bincount(index, minlength=V**N).float() / R
    assert 0.5 * (freq - exact).abs().sum() < 0.04  # plain sampling's own noise here is ~0.02
    assert 0.05 < out.draft_acceptance < 0.95


def test_mtp_draft_errors():
    prompt = torch.randint(0, 13, (2, 4))
    with pytest.raises(ValueError, match="MTP modules"):
        generate(lrnn(["attn"], n_predict=0), prompt, 4, mtp_draft=True)
    model = lrnn(["attn"])
    with pytest.raises(TypeError, match="mtp_draft must be a bool"):
        generate(model, prompt, 4, mtp_draft=1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(model, prompt, 4, mtp_draft=True, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="prompts of different lengths"):
        generate(model, prompt, 4, mtp_draft=True, lengths=torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="stop_sequences"):
        generate(model, prompt, 4, mtp_draft=True, stop_sequences=[[1, 2]])


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("name", ["tiny-nemotron-h-like", "tiny-falcon-h1-like", "tiny-deepseek-like"])
def test_new_tiny_presets_build_train_and_decode(name, tmp_path):
    preset = load_config(name)
    config = TrainConfig(**{**preset["train"], "steps": 2, "batch_size": 2, "eval_every": 0, "ckpt_every": 0,
                            "sample_tokens": 0, "device": "cpu", "warmup_steps": 1,
                            "task_options": {"seq_len": 32}})
    result = train(preset["model"], config, tmp_path, progress=False, log=lambda m: None)
    assert math.isfinite(result.metrics["train_loss"])
    model = result.model.eval()
    prompt = torch.randint(0, model.vocab_size, (1, 6))
    plain = generate(model, prompt, 8, temperature=0)
    assert plain.tokens.shape == (1, 8)
    if model.config.mtp_n_predict:
        assert torch.equal(generate(model, prompt, 8, temperature=0, mtp_draft=True).tokens, plain.tokens)


@pytest.mark.parametrize("name", ["nemotron-h-like", "falcon-h1-like", "deepseek-like"])
def test_new_gpu_presets_describe_the_families(name):
    config = ModelConfig.from_data(load_config(name)["model"])
    types = config.mixer_types
    if name == "deepseek-like":
        assert set(types) == {"mla"} and config.mtp_n_predict == 1
    else:
        assert "attn" in types and types.count("mamba2") >= 3 * types.count("attn")
        assert config.mlp == ("relu2_mlp" if name == "nemotron-h-like" else "gated_mlp")
    with torch.device("meta"):
        assert sum(p.numel() for p in build_model(load_config(name)["model"]).parameters()) > 2e8
