"""A replaced model inside Hugging Face's Trainer, the loop most QLoRA fine-tunes run in: it trains,
writes checkpoints (the model's state dict: 4-bit base and adapters; the optimizer's), and a run
resumed from a checkpoint into a freshly built model ends where the uninterrupted run ends, bit for
bit, with torch's AdamW (Trainer's default) and with this package's PagedAdamW8bit.

The oracle is the uninterrupted run itself: the resumed model starts from other random weights
(base and adapters), so only a checkpoint that restores everything (the quantized base buffers,
the adapters, the optimizer's 8-bit states, the schedule) can land on the same bits.
"""

from __future__ import annotations

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.nn import QLoRALinear

transformers = pytest.importorskip("transformers", reason="transformers (Trainer) is a test dependency")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate, a test dependency")

STEPS, SAVE_AT = 6, 3


def _model(seed: int):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    # r = 16 on 256 features: lora_A has 4096 elements, so PagedAdamW8bit keeps 8-bit states for it.
    qk.replace_linear(model, target_modules="all-linear", r=16, lora_alpha=32, compute_dtype=torch.float32)
    return model


def _trainer(model, out_dir, optimizer: str):
    ids = torch.randint(0, 96, (16, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        str(out_dir), per_device_train_batch_size=4, max_steps=STEPS, save_steps=SAVE_AT, save_strategy="steps",
        logging_steps=1, learning_rate=3e-3, lr_scheduler_type="linear", weight_decay=0.01, report_to=[],
        use_cpu=True, seed=7, disable_tqdm=True,
    )
    extra = {}
    if optimizer == "PagedAdamW8bit":
        extra["optimizer_cls_and_kwargs"] = (qk.optim.PagedAdamW8bit, {"lr": 3e-3, "weight_decay": 0.01})
    return transformers.Trainer(model=model, args=args, train_dataset=data, **extra)


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("optimizer", ["torch AdamW", "PagedAdamW8bit"])
def test_trainer_resume_from_checkpoint_ends_bit_identical(tmp_path, optimizer):
    model = _model(seed=0)
    trainer = _trainer(model, tmp_path, optimizer)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == STEPS and losses[-1] < losses[0]
    if optimizer == "PagedAdamW8bit":
        assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                          else trainer.optimizer, qk.optim.PagedAdamW8bit)
        states = [s for s in trainer.optimizer.state.values() if "exp_avg_q" in s]
        assert states, "no parameter got 8-bit states: the test would not cover them"
    final = {k: v.clone() for k, v in model.state_dict().items()}

    resumed = _model(seed=1)  # other base and adapter weights: the checkpoint must restore them all
    layer = next(m for m in resumed.modules() if isinstance(m, QLoRALinear))
    name = next(n for n, m in resumed.named_modules() if m is layer)
    assert not torch.equal(layer.packed_weight, final[f"{name}.packed_weight"])
    trainer2 = _trainer(resumed, tmp_path, optimizer)
    trainer2.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{SAVE_AT}"))
    assert _losses(trainer2)[SAVE_AT:] == losses[SAVE_AT:]
    got = resumed.state_dict()
    assert got.keys() == final.keys()
    for k, v in final.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    start = _model(seed=0).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in final.items() if "lora_B" in k), "nothing trained"
