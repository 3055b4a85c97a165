"""Training and generation throughput on one GPU, LlamaThink beside its Hugging Face peers, in ONE process.

    python benchmarks/bench_gpu.py [--batch 16] [--seq 1024] [--steps 10] [--out results.json]

Models at the 95M shape with tied embeddings: LlamaThink with each available Gated DeltaNet backend (fla, torch),
transformers' LlamaForCausalLM (all full attention) and transformers' Qwen3.5 text model with the pattern
linear, linear, full, full (the closest HF peer). Every model trains with bf16 autocast and fused AdamW on random
tokens; we report tokens/s, MFU against `--peak-tflops` (6 x (non-embedding params + head) + attention terms per
token, `llamathink.modeling_llamathink.flops_per_token` for LlamaThink, the same 6N rule for the peers) and peak
memory, then greedy `generate()` tokens/s at batch 1 and 32.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def versions() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        info["fla"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["driver"] = torch.version.cuda
    return info


def build(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamathink import LlamaThinkConfig, LlamaThinkForCausalLM

    if name.startswith("llamathink"):
        # llamathink:<backend>[:eager-decode]  (eager-decode: one-token steps without CUDA graphs)
        parts = name.split(":")
        return LlamaThinkForCausalLM(
            LlamaThinkConfig(gdn_backend=parts[1], decode_cuda_graphs="eager-decode" not in parts)
        )
    if name == "hf-llama":
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=16,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            rope_theta=20000.0,
        )
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg)
    if name == "hf-qwen3.5":
        from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

        cfg = Qwen3_5TextConfig(
            vocab_size=32000,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=16,
            layer_types=["linear_attention", "linear_attention", "full_attention", "full_attention"] * 4,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            linear_num_key_heads=9,
            linear_num_value_heads=9,
            linear_key_head_dim=112,
            linear_value_head_dim=112,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.5},
        )
        cfg._attn_implementation = "sdpa"
        return Qwen3_5ForCausalLM(cfg)
    raise ValueError(name)


def flops_per_token(name: str, model, seq: int) -> float:
    if name.startswith("llamathink"):
        from llamathink.modeling_llamathink import flops_per_token as ours

        return ours(model.config, seq)
    cfg = model.config
    n = (
        sum(p.numel() for n_, p in model.named_parameters() if "embed_tokens" not in n_)
        + cfg.vocab_size * cfg.hidden_size
    )
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    attn = 0.0
    for t in layer_types:
        if t == "full_attention":
            attn += 6.0 * cfg.num_attention_heads * cfg.head_dim * seq
        else:
            attn += 12.0 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
    return 6.0 * n + attn


def bench_train(name, batch, seq, steps, warmup, peak, compile_model=False) -> dict:
    torch.manual_seed(0)
    if compile_model:  # a fresh start per model: no guards or automatic-dynamic shapes left by the previous one
        torch._dynamo.reset()
    model = build(name).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(name, model, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if compile_model else model
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t_first = time.perf_counter()
    step()  # the first step also compiles
    torch.cuda.synchronize()
    first_step_s = time.perf_counter() - t_first
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    tok_s = batch * seq / dt
    result = {
        "model": name,
        "params": n_params,
        "batch": batch,
        "seq": seq,
        "compiled": compile_model,
        "step_s": dt,
        "tokens_per_s": tok_s,
        "mfu": tok_s * fpt / peak,
        "flops_per_token": fpt,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": float(loss),
        "first_step_s": first_step_s,
    }
    del model, opt, step_model
    gc.collect()
    torch.cuda.empty_cache()
    return result


@torch.no_grad()
def bench_generate(name, batch, prompt_len=32, new_tokens=128) -> dict:
    torch.manual_seed(0)
    model = build(name).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(3, 32000, (batch, prompt_len), device="cuda")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + new_tokens
    result = {
        "model": name,
        "batch": batch,
        "new_tokens": new_tokens,
        "seconds": dt,
        "tokens_per_s_per_sequence": new_tokens / dt,
        "tokens_per_s_total": batch * new_tokens / dt,
    }
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--models", default="llamathink:fla,llamathink:torch,hf-llama,hf-qwen3.5")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd training")
    parser.add_argument("--compiled-only", action="store_true", help="measure only torch.compile'd training")
    parser.add_argument("--generate-batches", default="1,32")
    parser.add_argument("--train-batches", default=None, help="comma list of batch sizes (default: --batch)")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    results = {"versions": versions(), "train": [], "generate": []}
    print(json.dumps(results["versions"]))
    peak = args.peak_tflops * 1e12
    train_batches = [int(x) for x in (args.train_batches or str(args.batch)).split(",")]
    for name in args.models.split(","):
        for compiled in [True] if args.compiled_only else [False, True] if args.compile else [False]:
            for batch in [] if args.no_train else train_batches:
                try:
                    r = bench_train(name, batch, args.seq, args.steps, args.warmup, peak, compiled)
                except Exception as err:  # one failing peer (or an out-of-memory batch) must not hide the others
                    r = {
                        "model": name,
                        "batch": batch,
                        "compiled": compiled,
                        "error": f"{type(err).__name__}: {err}"[:500],
                    }
                    gc.collect()
                    torch.cuda.empty_cache()
                results["train"].append(r)
                print(json.dumps(r), flush=True)
        for b in [] if args.no_generate else (int(x) for x in args.generate_batches.split(",") if x):
            try:
                r = bench_generate(name, b)
            except Exception as err:
                r = {"model": name, "batch": b, "error": f"{type(err).__name__}: {err}"[:500]}
                torch.cuda.empty_cache()
            results["generate"].append(r)
            print(json.dumps(r), flush=True)
        if args.out:  # after every model, so a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
