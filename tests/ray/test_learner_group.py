"""LearnerGroup on a real local Ray: 2 DeepSpeed ranks (CPU, gloo) of a tiny random Llama.

Every test runs against ZeRO-1 in the default tier, and against ZeRO 0, 2 and 3 in the slow tier
(`pytest -m slow`). One group serves all tests of a stage (starting it costs ~30 s on 2 cores:
each rank imports DeepSpeed and transformers); its very first update is made by the fixture, so
the comparison with the single-process reference starts from the same fresh optimizer state
whichever test runs first. The first DeepSpeed init on a machine also compiles its CPU
communication op (~35 s or more, cached afterwards).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray
import torch

from learners.learner_group import LearnerGroup
from learners.learner_rank import learning_rate
from learners.policy import rank_rows, split_sizes
from spear_ray.algo.losses import aggregate_loss, compute_policy_loss, entropy_loss
from spear_ray.config.schema import SpearConfig
from spear_ray.containers import TrainBatch
from spear_ray.recipe import learner_spec

pytestmark = pytest.mark.ray

VOCAB = 64
RANKS = 2
MINI_BATCHES = 2
PPO_EPOCHS = 2


# ----------------------------------------------------------------------------- helpers


def build_tiny_model_dir(path: Path) -> Path:
    """A tiny random Llama (hidden 32, 2 layers, tied embeddings; spear_ray.models' builder) with
    a word-level tokenizer of VOCAB words, saved as an HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from spear_ray.models.tiny import ModelSize, build_model

    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    size = ModelSize(32, 2, 2, 2, 64, max_position_embeddings=256)
    build_model(size, tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_config(model_dir: Path, zero_stage: int) -> SpearConfig:
    return SpearConfig.model_validate(
        {
            "model": {"path": str(model_dir), "dtype": "float32"},
            "env": {"name": "frozenlake"},
            "rollout": {
                "prompts_per_step": 8,  # x 2 = the 16 rows of make_batch
                "samples_per_prompt": 2,
                "max_prompt_tokens": 16,
                "max_response_tokens": 48,
                "max_tokens_per_turn": 16,
            },
            "algo": {
                "policy_loss": {"on_policy_cov": {"mode": "none"}, "replay_cov": {"mode": "none"}}
            },
            "learner": {
                "num_ranks": RANKS,
                "zero_stage": zero_stage,
                "lr": 2e-3,
                "lr_schedule": "cosine",
                "warmup_steps": 2,
                "grad_clip": 0.1,  # below the gradient norms seen here (~0.2): every step clips
                "ppo_epochs": PPO_EPOCHS,
                "mini_batches_per_step": MINI_BATCHES,
                "tokens_per_micro_batch": 64,  # 1-6 rows per micro-batch
            },
            "run": {"total_steps": 20},
        }
    )


def make_batch(
    seed: int, rows: int = 16, width: int = 44, lengths: list[int] | None = None
) -> TrainBatch:
    """Rows of 10-44 tokens, a 4-token prompt, loss on most later tokens, one filtered row,
    per-row advantages; old_logprobs are filled in by the tests."""
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(10, width + 1, (rows,), generator=g).tolist()
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    loss_mask = torch.zeros(rows, width)
    for r, n in enumerate(lengths):
        input_ids[r, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        attention_mask[r, :n] = 1
        loss_mask[r, 4:n] = (torch.rand(n - 4, generator=g) < 0.85).float()
    loss_mask[rows - 3] = 0
    advantages = torch.randn(rows, 1, generator=g).expand(rows, width) * loss_mask
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        old_logprobs=torch.zeros(rows, width),
        advantages=advantages.contiguous(),
        group_ids=torch.arange(rows) // 2,
        rewards=torch.zeros(rows),
    )


def with_behaviour_logprobs(group: LearnerGroup, batch: TrainBatch, seed: int) -> TrainBatch:
    """old_logprobs = current policy + noise, like a sampler's that drifted: clipping acts."""
    batch = group.recompute_old_logprobs(batch)
    generator = torch.Generator().manual_seed(seed)
    noise = 0.3 * torch.randn(batch.old_logprobs.shape, generator=generator)
    batch.old_logprobs = (batch.old_logprobs + noise) * batch.loss_mask
    return batch


def uneven_lengths() -> list[int]:
    """Rank 0 gets only long rows (one per micro-batch, 4 per mini-batch), rank 1 only short
    ones (all in one micro-batch): rank 1 must make 3 padding passes per mini-batch."""
    per_shard = 16 // (RANKS * MINI_BATCHES)  # rank_rows: mini-batch m = [rank 0 | rank 1]
    lengths = []
    for m in range(MINI_BATCHES):
        lengths += [40 - m - k for k in range(per_shard)] + [10 + k for k in range(per_shard)]
    return lengths


def first_update(group: LearnerGroup) -> dict:
    before = group.full_state_dict()
    batch = with_behaviour_logprobs(group, make_batch(seed=0, lengths=uneven_lengths()), seed=100)
    metrics = group.update(batch=batch, step=0, phase="on_policy")
    return {"before": before, "batch": batch, "metrics": metrics, "after": group.full_state_dict()}


def load_model(model_dir: Path, state: dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def reference_logp_entropy(model, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct log_softmax / entropy on the untrimmed batch, aligned with TrainBatch."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logsm = torch.log_softmax(logits[:, :-1], dim=-1)
    logp = logsm.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    zero = torch.zeros(batch.rows, 1)
    return torch.cat([zero, logp], 1), torch.cat([zero, entropy], 1)


def reference_pg_losses(config: SpearConfig, logp: torch.Tensor, batch: TrainBatch):
    """Per-token PPO-clip losses (no Clip-Cov) of `batch` at log-probs `logp`, plain torch."""
    pl = config.algo.policy_loss
    return compute_policy_loss(
        "none",
        logp,
        batch.old_logprobs,
        batch.advantages,
        batch.loss_mask.bool(),
        clip_low=pl.clip_low,
        clip_high=pl.clip_high,
        dual_clip=pl.dual_clip_c,
        log_ratio_clamp=pl.log_ratio_clamp,
    ).per_token_loss


def reference_update(
    config: SpearConfig, model, batch: TrainBatch, step: int
) -> tuple[list[float], list[float]]:
    """The same update in one process with plain torch: whole mini-batches, no micro-batches,
    no ranks. Returns each optimizer step's loss and gradient norm (before clipping)."""
    lc, pl = config.learner, config.algo.policy_loss
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay
    )
    lr = learning_rate(
        step,
        peak=lc.lr,
        schedule=lc.lr_schedule,
        warmup_steps=lc.warmup_steps,
        total_steps=config.run.total_steps,
    )
    norm = {"norm_length": config.rollout.max_response_tokens}
    losses, grad_norms = [], []
    for _ in range(lc.ppo_epochs):
        start = 0
        for size in split_sizes(batch.rows, lc.mini_batches_per_step):
            mini = batch.select(list(range(start, start + size)))
            start += size
            mask = mini.loss_mask.bool()
            logp, entropy = reference_logp_entropy(model, mini)
            per_token = reference_pg_losses(config, logp, mini)
            # every row of the mini-batch counts in the divisor, masked ones too (the reference's)
            norm["num_sequences"] = mini.rows
            loss = aggregate_loss(per_token, mask, pl.aggregation, **norm)
            loss = loss + entropy_loss(entropy, mask, pl.aggregation, coef=pl.entropy_coef, **norm)
            optimizer.zero_grad()
            loss.backward()
            grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), lc.grad_clip))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            losses.append(loss.item())
    return losses, [float(n) for n in grad_norms]


def rank_local_states(group: LearnerGroup) -> list[dict[str, torch.Tensor]]:
    """Each rank's own copy of the parameters (under ZeRO-3 each rank gathers its partitions
    with the others, so this is called on all ranks at once)."""

    def local_state(rank):
        import deepspeed

        params = list(rank.engine.module.parameters())
        enabled = rank.zero_stage == 3
        with deepspeed.zero.GatheredParameters(params, enabled=enabled):
            return {name: p.detach().clone() for name, p in rank.engine.module.named_parameters()}

    return ray.get([actor.__ray_call__.remote(local_state) for actor in group.ranks])


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def load_hf_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    """The session's local Ray (tests/conftest.py)."""
    return ray_local


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(
    scope="module",
    params=[
        1,
        pytest.param(0, marks=pytest.mark.slow),
        pytest.param(2, marks=pytest.mark.slow),
        pytest.param(3, marks=pytest.mark.slow),
    ],
    ids=lambda stage: f"zero{stage}",
)
def learners(request, ray_cluster, model_dir):
    """(group, config, record of the group's first update: states before/after, batch,
    metrics)."""
    config = make_config(model_dir, zero_stage=request.param)
    group = LearnerGroup(learner_spec(config))
    first = first_update(group)
    yield group, config, first
    group.shutdown()


# ----------------------------------------------------------------------------- tests


def test_sharded_update_equals_the_single_process_reference(learners, model_dir):
    _, config, first = learners
    metrics = first["metrics"]
    assert metrics["optimizer_steps"] == PPO_EPOCHS * MINI_BATCHES and metrics["skipped"] == 0
    assert metrics["clip_frac"] > 0  # behaviour log-probs differ from the policy: clipping acts
    assert metrics["micro_batches"] == PPO_EPOCHS * MINI_BATCHES * (4 + 1)  # see uneven_lengths
    model = load_model(model_dir, first["before"])
    losses, grad_norms = reference_update(config, model, first["batch"], step=0)
    # loss and gradient norm pin the gradient's scale (Adam's update hardly depends on it)
    assert metrics["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(sum(grad_norms) / len(grad_norms), rel=1e-5)
    assert min(grad_norms) > config.learner.grad_clip  # every step was clipped
    assert metrics["lr"] == pytest.approx(config.learner.lr / 2)  # warm-up step 1 of 2
    expected = {k: v for k, v in model.state_dict().items() if k in first["after"]}
    assert expected.keys() == first["after"].keys()
    for name, tensor in first["after"].items():
        moved = (tensor - first["before"][name]).abs().max().item()
        assert moved > 1e-3, name  # every parameter moved by ~ lr * steps: not vacuous
        # fp32 rounding differs (2 ranks, micro-batches); Adam magnifies it on the tiny
        # gradient entries up to ~2e-6 here, against moves of ~4e-3
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=name)


def test_no_shared_memory_buffer_is_left_in_dev_shm(learners):
    """DeepSpeed's CPU allreduce buffers (69 MB a rank) are unlinked once every rank has mapped
    them: a run never leaves them in /dev/shm, even when its ranks are killed. The update tests
    around this one show the collectives still work."""
    from learners.learner_rank import SHM_BUFFER_DIR, shm_buffer_path

    group, _, _ = learners
    addr, port = group.rendezvous
    for rank in range(group.num_ranks):
        assert not shm_buffer_path(addr, port, rank).exists()
    assert not list(SHM_BUFFER_DIR.glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_*"))


def test_release_unlinks_the_ranks_buffer_file(tmp_path, monkeypatch):
    import learners.learner_rank as learner_rank

    monkeypatch.setattr(learner_rank, "SHM_BUFFER_DIR", tmp_path)
    path = learner_rank.shm_buffer_path("10.0.0.1", 29500, 1)
    assert path.name == f"deepspeed_allreduce_buffer_{os.getuid()}_10.0.0.1_29500_1"
    path.write_bytes(b"x")
    learner_rank.release_shm_buffer("10.0.0.1", 29500, 1)  # no process group here: no barrier
    assert not path.exists()
    learner_rank.release_shm_buffer("10.0.0.1", 29500, 1)  # already gone: fine


def test_both_ranks_hold_identical_parameters(learners):
    group, _, _ = learners
    states = rank_local_states(group)
    assert_same_state(states[0], states[1])
    full = group.full_state_dict()
    assert_same_state({k: states[0][k] for k in full}, full)


def test_compute_logprobs_matches_the_model(learners, model_dir):
    group, _, _ = learners
    batch = make_batch(seed=7)
    logp = group.compute_logprobs(batch=batch)
    with torch.no_grad():
        expected, _ = reference_logp_entropy(load_model(model_dir, group.full_state_dict()), batch)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(logp[real], expected[real], rtol=1e-5, atol=1e-5)
    assert torch.all(logp[:, 0] == 0) and torch.all(logp[~real] == 0)


def test_update_is_idempotent_per_step_and_phase(learners):
    group, _, _ = learners
    batch = with_behaviour_logprobs(group, make_batch(seed=8), seed=108)
    metrics = group.update(batch=batch, step=1, phase="on_policy")
    before = group.full_state_dict()
    again = group.update(batch=batch, step=1, phase="on_policy")  # a retried call
    assert again == metrics
    assert_same_state(group.full_state_dict(), before)
    # the replay phase of the same step is a separate update with its own optimizer steps
    replay = group.update(batch=batch, step=1, phase="replay", loss_weight=0.5)
    assert replay["optimizer_steps"] == PPO_EPOCHS * MINI_BATCHES
    assert replay["loss_weight"] == 0.5
    # loss = w * (pg_loss - coef * aggregated entropy), and that entropy term is at most
    # coef * log(vocab) with rows no longer than the norm length
    bound = 0.5 * 0.001 * torch.log(torch.tensor(float(VOCAB))).item()
    assert abs(replay["loss"] - 0.5 * replay["pg_loss"]) <= bound
    assert not same_state(group.full_state_dict(), before)


def test_zero_loss_weight_changes_nothing(learners):
    group, _, _ = learners
    before = group.full_state_dict()
    metrics = group.update(batch=make_batch(seed=9), step=2, phase="replay", loss_weight=0.0)
    assert metrics["optimizer_steps"] == 0 and metrics["micro_batches"] == 0
    assert metrics["logp_change"] == 0.0
    assert_same_state(group.full_state_dict(), before)


def test_a_nan_batch_on_one_rank_is_skipped_by_all_ranks(learners):
    group, _, _ = learners
    batch = with_behaviour_logprobs(group, make_batch(seed=10), seed=110)
    # one NaN advantage in every mini-batch, only in rows that rank 0 trains on
    rows0, sizes = rank_rows(batch.rows, num_ranks=RANKS, mini_batches=MINI_BATCHES, rank=0)
    for row in (rows0[0], rows0[sizes[0]]):
        col = int(batch.loss_mask[row].nonzero()[0])
        batch.advantages[row, col] = float("nan")
    before = group.full_state_dict()
    metrics = group.update(batch=batch, step=3, phase="on_policy")
    assert metrics["skipped"] == PPO_EPOCHS * MINI_BATCHES and metrics["optimizer_steps"] == 0
    assert_same_state(group.full_state_dict(), before)
    states = rank_local_states(group)
    assert_same_state(states[0], states[1])
    # training goes on normally afterwards
    batch = with_behaviour_logprobs(group, make_batch(seed=11), seed=111)
    metrics = group.update(batch=batch, step=4, phase="on_policy")
    assert metrics["skipped"] == 0 and metrics["optimizer_steps"] == PPO_EPOCHS * MINI_BATCHES
    assert not same_state(group.full_state_dict(), before)


def test_weight_buckets_reassemble_to_the_exact_state_dict(learners):
    group, _, _ = learners
    state = group.full_state_dict()
    assert "lm_head.weight" not in state  # tied to the embeddings: sent once
    weights = group.publish_weights(bucket_bytes=20_000)  # several buckets of a ~90 kB model
    assert len(weights) > 2

    @ray.remote(num_cpus=0)
    def rollout_side(named_tensors):  # what a rollout worker's engine does with them
        return {name: tensor.clone() for name, tensor in named_tensors}

    received = ray.get(rollout_side.remote(weights))
    assert list(received) == list(state)
    assert_same_state(received, state)


def test_checkpoint_round_trip(learners, tmp_path):
    group, _, _ = learners
    saved = group.full_state_dict()
    group.save_checkpoint(directory=str(tmp_path), step=5)
    batch = with_behaviour_logprobs(group, make_batch(seed=12), seed=112)
    group.update(batch=batch, step=6, phase="on_policy")
    after_update = group.full_state_dict()
    assert not same_state(after_update, saved)

    assert group.load_checkpoint(directory=str(tmp_path)) == 5
    assert_same_state(group.full_state_dict(), saved)
    # the optimizer state came back too: redoing step 6 gives the same parameters
    group.update(batch=batch, step=6, phase="on_policy")
    assert_same_state(group.full_state_dict(), after_update)
    # and the exported HF directory holds the saved weights and loads with transformers
    assert_same_state(load_hf_state(tmp_path / "policy"), saved)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy"))
    assert torch.equal(model.lm_head.weight, saved["model.embed_tokens.weight"])
    assert AutoTokenizer.from_pretrained(str(tmp_path / "policy")).pad_token == "<pad>"


def test_a_replay_of_positive_advantage_rows_raises_their_log_prob(learners):
    """replay/logp_change: the SIL loss with A_hat > 0 raises the replayed rows' log-probs, and
    the number reduced over the 2 ranks is the token-weighted mean over all rows (what the
    driver measures with log-probs before and after)."""
    group, _, _ = learners
    replay = group.recompute_old_logprobs(make_batch(seed=13))  # logp_old as the buffer stores
    replay.advantages = replay.advantages.abs()  # recalibrated advantages A_hat > 0
    before = group.compute_logprobs(batch=replay)
    metrics = group.update(batch=replay, step=7, phase="replay", loss_weight=1.0)
    after = group.compute_logprobs(batch=replay)
    assert metrics["optimizer_steps"] == PPO_EPOCHS * MINI_BATCHES and metrics["lr"] > 0
    mask = replay.loss_mask.bool()
    expected = (after[mask].double() - before[mask].double()).mean().item()
    assert metrics["logp_change"] > 1e-3
    assert metrics["logp_change"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    on_policy = group.update(batch=replay, step=7, phase="on_policy")
    assert "logp_change" not in on_policy


def test_a_replayed_row_weighs_what_an_on_policy_row_weighs(learners, model_dir):
    """A replay batch of 4 rows is one optimizer step whose loss divides by the on-policy
    mini-batch size M = 8, not by its own rows (docs/algorithm.md §5): the reported loss is the
    plain-torch loss of those rows over M. The old divisor (its 3 rows with loss tokens) made each
    replayed row weigh 8/3 of an on-policy row here. Last in the file: its step is the latest."""
    group, config, _ = learners
    m = config.rollout.samples_per_step // config.learner.mini_batches_per_step
    replay = with_behaviour_logprobs(group, make_batch(seed=12, rows=4), seed=112)
    model = load_model(model_dir, group.full_state_dict())
    # past the cosine schedule's end the lr is 0: every epoch sees the same weights
    step = config.run.total_steps + 5
    metrics = group.update(batch=replay, step=step, phase="replay", loss_weight=1.0)
    assert metrics["lr"] == 0.0 and metrics["optimizer_steps"] == PPO_EPOCHS  # 1 mini-batch
    assert metrics["logp_change"] == pytest.approx(0.0, abs=1e-7)  # lr 0: nothing moved
    pl = config.algo.policy_loss
    mask = replay.loss_mask.bool()
    with torch.no_grad():
        logp, entropy = reference_logp_entropy(model, replay)
    per_token = reference_pg_losses(config, logp, replay)
    norm = {"norm_length": config.rollout.max_response_tokens, "num_sequences": m}
    pg = aggregate_loss(per_token, mask, pl.aggregation, **norm)
    ent = entropy_loss(entropy, mask, pl.aggregation, coef=pl.entropy_coef, **norm)
    assert metrics["pg_loss"] == pytest.approx(pg.item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx((pg + ent).item(), rel=1e-5)
    # the old divisor, the replay's own rows with loss tokens (3: make_batch filters one row)
    own_rows = {**norm, "num_sequences": int(mask.any(dim=-1).sum())}
    old = aggregate_loss(per_token, mask, pl.aggregation, **own_rows)
    assert old.item() == pytest.approx(pg.item() * m / 3) and abs(pg.item()) > 1e-6
