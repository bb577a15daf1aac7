"""The trainer's response-only loss equals the full-logits loss, gradients included; LoRA+ groups."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.config import LoraSettings
from training.model import add_lora
from training.trainer import ResponseOnlyTrainer, loraplus_optimizer


def _trainer(tiny, tmp_path, ratio=None, tokens_per_step=None):
    from datasets import Dataset
    from trl import SFTConfig

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny.base_dir, dtype=torch.float32)
    model = add_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():  # B starts at zero: give the adapter something to say
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=1,
        learning_rate=1e-3,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    data = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])
    tokenizer = AutoTokenizer.from_pretrained(tiny.base_dir)
    optimizer = loraplus_optimizer(model, args, ratio) if ratio else None
    return ResponseOnlyTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        optimizers=(optimizer, None),
        tokens_per_step=tokens_per_step,
    )


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :5] = -100  # prompt
    labels[mask == 0] = -100
    labels[2, :] = -100  # a row with no response tokens at all
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_response_only_loss_and_gradients_equal_the_full_logits_ones(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path)
    model = trainer.model
    model.train()
    batch = _batch(model.config.vocab_size)

    reference = model(**batch).loss  # transformers: full logits, shifted, mean over labelled tokens
    reference.backward()
    expected = _grads(model)
    model.zero_grad()

    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    got = _grads(model)

    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())
    assert trainer._metrics["train"]["mean_token_accuracy"]


def test_loss_is_divided_by_the_items_of_the_whole_accumulated_batch(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path)
    batch = _batch(trainer.model.config.vocab_size)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    mean = trainer.compute_loss(trainer.model, dict(batch))
    spread = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(4 * labelled))
    assert spread.item() == pytest.approx(mean.item() / 4, rel=1e-5)


def test_token_weighting_divides_the_summed_loss_by_a_constant_in_training_only(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, tokens_per_step=40.0)
    model = trainer.model
    batch = _batch(model.config.vocab_size)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    model.eval()
    mean = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(labelled))
    model.train()
    weighted = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(labelled))
    # a batch with fewer labelled tokens than the run's mean weighs less, whatever the Trainer counts
    assert weighted.item() == pytest.approx(mean.item() * labelled / 40.0, rel=1e-5)
    assert trainer.loss_is_scaled_for_ga is True  # the constant already spans accumulated micro-batches
    assert _trainer(tiny, tmp_path).loss_is_scaled_for_ga is None  # batch weighting: the Trainer's rule


def test_tokens_per_step_counts_the_labelled_targets():
    from training.config import TrainSettings
    from training.data import Example
    from training.train import _tokens_per_step

    examples = [Example([1, 2, 3, 4], [-100, -100, 3, 4]), Example([1, 2, 3, 4, 5, 6], [-100, 2, 3, 4, 5, 6])]
    settings = TrainSettings(batch_size=4, grad_accum=2)
    assert _tokens_per_step(examples, settings, processes=1) == pytest.approx((2 + 5) / 2 * 4 * 2)
    # batch_size spans all processes: each of 2 ranks steps on half of it
    assert _tokens_per_step(examples, settings, processes=2) == pytest.approx((2 + 5) / 2 * 2 * 2)


def test_batch_size_must_split_evenly_over_the_processes():
    from training.train import per_device_batch

    assert per_device_batch(8, 2) == 4
    with pytest.raises(ValueError, match=r"train.batch_size \(6\) must be a multiple of the number of processes \(4\)"):
        per_device_batch(6, 4)


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, ratio=16)
    optimizer = trainer.optimizer
    lr_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = group["lr"]
    named = dict(trainer.model.named_parameters())
    a = [lr_of[id(p)] for n, p in named.items() if "lora_A" in n]
    b = [lr_of[id(p)] for n, p in named.items() if "lora_B" in n]
    assert a and b and set(a) == {1e-3} and set(b) == {16e-3}
    assert len(lr_of) == sum(p.requires_grad for p in named.values())  # every trainable weight, once


def test_length_buckets_group_like_lengths_in_random_order():
    import random

    from training.trainer import LengthBuckets

    rng = random.Random(0)
    lengths = [rng.randint(10, 320) for _ in range(4000)]
    sampler = LengthBuckets(lengths, batch_size=8, seed=42)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))  # every example once
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    spread = [max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches]
    assert sorted(spread)[len(spread) // 2] <= 4  # little padding
    # No long -> short sweep (what transformers' group_by_length does per 50 batches): the
    # longest member of consecutive batches is uncorrelated.
    tops = torch.tensor([float(max(lengths[j] for j in b)) for b in batches])
    corr = torch.corrcoef(torch.stack([tops[:-1], tops[1:]]))[0, 1]
    assert abs(corr) < 0.1
    assert list(LengthBuckets(lengths, 8, seed=42)) == order  # resumable
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_length_buckets_keep_every_step_on_one_run_when_the_data_does_not_divide():
    import random

    from training.trainer import LengthBuckets

    rng = random.Random(1)
    lengths = [rng.randint(10, 320) for _ in range(4003)]  # 500 full batches of 8 and one of 3
    order = list(LengthBuckets(lengths, batch_size=8, seed=42))
    assert sorted(order) == list(range(len(lengths)))
    # The data loader cuts the stream into steps of 8 by count: every full step must be one
    # like-length run (a short run mid-stream would shift all later steps across two runs).
    steps = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert [len(s) for s in steps] == [8] * 500 + [3]
    spread = [max(lengths[j] for j in s) - min(lengths[j] for j in s) for s in steps[:-1]]
    assert max(spread) <= 40 and sorted(spread)[len(spread) // 2] <= 4


def test_trainer_draws_length_buckets_when_grouping_by_length(tiny, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from training.trainer import LengthBuckets

    trainer = _trainer(tiny, tmp_path)
    data = Dataset.from_list([{"input_ids": [1] * n, "labels": [1] * n, "length": n} for n in range(2, 40)])
    trainer.args = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        train_sampling_strategy="group_by_length",
    )
    assert isinstance(trainer._get_train_sampler(data), LengthBuckets)
    trainer.args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert not isinstance(trainer._get_train_sampler(data), LengthBuckets)
