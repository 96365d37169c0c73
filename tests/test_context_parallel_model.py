"""Context-parallel language models on CPU with gloo: each rank runs its time chunk of the same rows,
and the logits, the loss (each rank's summed token loss over the global token count, all-reduced) and
every parameter gradient (all-reduced over the ranks) equal one process running the whole sequence, at
float64; the trainer with ``context_parallel=2`` trains what one process trains."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from seqblocks import LanguageModel, LanguageModelConfig, LRNNLMHeadModel
from seqblocks.checkpoint import load_pretrained
from seqblocks.parallel import context_parallel
from seqblocks.train import TrainConfig, latest_checkpoint, train

T, VOCAB = 16, 37


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, body, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        body(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(body, world: int, *args) -> None:
    mp.spawn(_entry, args=(world, _free_port(), body, args), nprocs=world, join=True)


def _models():
    hybrid = lambda: LRNNLMHeadModel(  # noqa: E731
        16, 4, 3, VOCAB, ["mamba", "attn", "sliding_window"], d_intermediate=24,
        mixer_kwargs={"mamba": {"expand": 1}, "attn": {"num_heads": 2, "rotary_emb_dim": 4},
                      "sliding_window": {"num_heads": 2, "num_heads_kv": 1, "window_size": 5}})
    learned = lambda: LanguageModel(LanguageModelConfig.tiny_gpt2(VOCAB, d_model=16, n_layers=2, n_heads=2,  # noqa: E731
                                                                  max_seq_len=T))
    irope = lambda: LanguageModel(LanguageModelConfig.from_pattern(  # noqa: E731
        ["chunked_gqa", "gqa", "mla"], VOCAB, d_model=16, irope=True, n_heads=2, n_kv_heads=1,
        attention_chunk_size=6, kv_lora_rank=8, rope_dim=4))
    return {"hybrid mamba / attn / sliding window": hybrid, "learned positions (GPT-2)": learned,
            "iRoPE chunked / NoPE gqa / mla": irope}


def _model_body(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, T), generator=g)
    targets = torch.randint(0, VOCAB, (2, T), generator=g)
    targets[0, 3] = targets[1, -1] = -100  # not scored
    count = int((targets != -100).sum())
    here = slice(rank * T // world, (rank + 1) * T // world)
    for name, make in _models().items():
        torch.manual_seed(0)
        model = make().double()
        ref = model(ids).logits
        ref_loss = F.cross_entropy(ref.flatten(0, 1), targets.flatten(), ignore_index=-100)
        ref_loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        for method in ("ring", "allgather"):
            with context_parallel(attention=method):
                logits = model(ids[:, here]).logits
                local = F.cross_entropy(logits.flatten(0, 1), targets[:, here].flatten(), ignore_index=-100,
                                        reduction="sum")
                (local / count).backward()
            label = f"{name}, {method}, rank {rank}"
            torch.testing.assert_close(logits, ref[:, here], msg=f"logits: {label}")
            total = local.detach().clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total / count, ref_loss.detach(), msg=f"loss: {label}")
            for n, p in model.named_parameters():
                grad = p.grad.clone()
                dist.all_reduce(grad)
                torch.testing.assert_close(grad, ref_grads[n], msg=f"d{n}: {label}")
            model.zero_grad(set_to_none=True)
    # The transformer stacks: a non-causal encoder with sinusoidal positions added at the chunk's offset
    # (ring attention that skips no block) and a decoder-only stack with RoPE.
    from seqblocks import TransformerDecoder, TransformerEncoder

    for stack in (TransformerEncoder(VOCAB, 16, 2, 2, 32),
                  TransformerDecoder(VOCAB, 16, 2, 2, 32, cross_attention=False, position="rope")):
        stack = stack.double()
        ref = stack(ids)
        with context_parallel():
            torch.testing.assert_close(stack(ids[:, here]), ref[:, here], msg=f"{type(stack).__name__}, rank {rank}")
    with context_parallel(), pytest.raises(ValueError, match="decoder-only"):
        TransformerDecoder(VOCAB, 16, 1, 2, 32)(ids[:, here], torch.zeros(2, 3, 16))
    # Activation checkpointing: the backward (here outside the with block, as on CUDA's autograd threads)
    # recomputes each block under the forward's group.
    from seqblocks.train.models import activation_checkpointing

    torch.manual_seed(0)
    model = _models()["hybrid mamba / attn / sliding window"]().double()
    ref = F.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert activation_checkpointing(model, 1) == 3
    with context_parallel():
        logits = model(ids[:, here]).logits
    (F.cross_entropy(logits.flatten(0, 1), targets[:, here].flatten(), ignore_index=-100, reduction="sum")
     / count).backward()
    for n, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, ref_grads[n], msg=f"d{n}: activation checkpointing, rank {rank}")
    with context_parallel():
        # the backbone's hidden states are this rank's chunk of the whole sequence's too
        hidden = model.backbone(ids[:, here])
        assert hidden.shape == (2, T // world, 16)
        for kwargs, match in ((dict(inference_params=model.allocate_inference_cache(2, T)), "caches"),
                              (dict(num_last_tokens=1), "num_last_tokens"),
                              (dict(cu_seqlens=torch.tensor([0, T // world, T])), "packed documents")):
            with pytest.raises(ValueError, match=match):
                model(ids[:, here], **kwargs)
        mtp = LRNNLMHeadModel(16, 4, 1, VOCAB, ["attn"], mixer_kwargs={"attn": {"num_heads": 2}}, mtp_n_predict=1)
        with pytest.raises(ValueError, match="MTP"):
            mtp(ids[:, here])
        gpt2 = _models()["learned positions (GPT-2)"]()
        with pytest.raises(ValueError, match="learned position table"):
            gpt2(torch.zeros(2, T, dtype=torch.long))  # the whole sequence: world x T > max_seq_len


def test_language_models_match_one_process():
    spawn(_model_body, 2)


TINY = {"d_model": 32, "d_state": 4, "n_layer": 2, "vocab_size": 0, "mixer_types": ["mamba", "attn"],
        "d_intermediate": 32, "mixer_kwargs": {"attn": {"num_heads": 2, "rotary_emb_dim": 8}, "mamba": {"expand": 1}}}


def _config(**kwargs) -> TrainConfig:
    values = dict(task="mqar", task_options={"vocab_size": 24, "num_kv_pairs": 2, "seq_len": 12, "eval_examples": 8},
                  steps=3, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0, ckpt_every=0, log_every=1,
                  sample_tokens=0, device="cpu")
    return TrainConfig(**{**values, **kwargs})


def _train_body(rank: int, world: int, out_dir: str, kwargs: dict) -> None:
    train(TINY, _config(**kwargs), out_dir, progress=False, log=lambda m: None)


def _rows(run_dir, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == kind]


@pytest.mark.parametrize("options", [
    {"activation_checkpointing": 1},  # every block recomputed in the backward pass, under the forward's group
    {"parallel": "fsdp", "context_parallel_attention": "allgather"},
], ids=["ddp-ring-checkpointed", "fsdp-allgather"])
def test_trainer_with_context_parallel_matches_one_process(tmp_path, options):
    single = tmp_path / "single"
    train(TINY, _config(parallel=options.get("parallel", "ddp")), single, progress=False, log=lambda m: None)
    split = tmp_path / "split"
    spawn(_train_body, 2, str(split), {"context_parallel": 2, **options})
    assert [r["loss"] for r in _rows(split, "train")] == pytest.approx([r["loss"] for r in _rows(single, "train")],
                                                                       rel=1e-5)
    # the held-out evaluation at the end ran under the group as well: the same metrics
    for key in ("loss", "acc", "seq_acc", "tokens"):
        assert _rows(split, "eval")[-1][key] == pytest.approx(_rows(single, "eval")[-1][key], rel=1e-5), key
    a, b = load_pretrained(latest_checkpoint(single)), load_pretrained(latest_checkpoint(split))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3, msg=name)  # Adam amplifies rounding near zero
    close = sum(torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))
    assert close >= 0.8 * len(list(a.parameters()))


def test_train_config_context_parallel_checks():
    with pytest.raises(ValueError, match="context_parallel"):
        TrainConfig(context_parallel=0)
    with pytest.raises(ValueError, match="context_parallel_attention"):
        TrainConfig(context_parallel_attention="stripes")
    from seqblocks.tasks import Batch
    from seqblocks.train.trainer import context_parallel_chunk

    batch = Batch(torch.arange(12).view(2, 6), torch.arange(12).view(2, 6) + 1)
    part = context_parallel_chunk(batch, 1, 3)
    assert part.input_ids.tolist() == [[2, 3], [8, 9]] and part.targets.tolist() == [[3, 4], [9, 10]]
    with pytest.raises(ValueError, match="divisible by 4"):
        context_parallel_chunk(batch, 0, 4)
    # 4 processes in 2 groups of 2: group i takes rows [2 i, 2 i + 2) of each micro-batch, its ranks the
    # two halves of their time
    from seqblocks.tasks import get_task
    from seqblocks.train.distributed import DistInfo
    from seqblocks.train.trainer import _micro_batches

    task = get_task("mqar", vocab_size=24, num_kv_pairs=2, seq_len=12, eval_examples=8)
    config = _config(context_parallel=2, batch_size=8, grad_accum=2)
    full = task.batch("train", 1, 8, config.seed)
    parts = {r: _micro_batches(task, 1, config, DistInfo(rank=r, world_size=4))[0] for r in range(4)}
    for m in range(2):
        for group in range(2):
            rows = slice(4 * m + 2 * group, 4 * m + 2 * group + 2)
            joined = torch.cat([parts[2 * group + c][m].input_ids for c in range(2)], dim=1)
            assert torch.equal(joined, full.input_ids[rows])
            assert torch.equal(torch.cat([parts[2 * group + c][m].targets for c in range(2)], dim=1),
                               full.targets[rows])


def test_trainer_refuses_context_parallel_without_enough_processes(tmp_path):
    with pytest.raises(ValueError, match="multiple of it"):
        train(TINY, _config(context_parallel=2), tmp_path / "run", progress=False, log=lambda m: None)
