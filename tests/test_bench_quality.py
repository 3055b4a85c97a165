"""The architecture ablations of `benchmarks/bench_quality.py` (BENCHMARKS.md section 2 publishes their losses):
each one is the model it claims to be, checked against an independent reference on the CPU in float64."""

import json
import math
import re
import sys
import types

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_quality as bq

from llamathink.modeling_llamathink import LlamaThinkCompressedSparseAttention, apply_rotary

# the residual projections start N(0, 0.02), not at zero (the default): every layer's mixer then reaches the logits
TINY = (
    "hidden_size=64,num_hidden_layers=4,num_attention_heads=4,num_key_value_heads=2,head_dim=16,intermediate_size=128,"
    "zero_init_residual=false"
)


def build(spec: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return bq.build_model(bq.parse_run(f"r:{TINY},{spec}" if spec else f"r:{TINY}"), seed).double().eval()


def csa_layer_call(model, ids):
    """(hidden_states, ctx, output) of the first CSA layer's mixer during `model(ids)`."""
    layer = next(m for m in model.modules() if isinstance(m, LlamaThinkCompressedSparseAttention))
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    return layer, *seen["args"], seen["out"]


def reference_blocks(layer, ctx, k_raw, v):
    """The compressed blocks, one at a time: keys and values of block j mean-pooled over its `stride` positions,
    through compress_k / compress_v, keys RoPE'd at the block centre -> [B, Hkv, N, D] each."""
    B, Hkv, T, D = k_raw.shape
    S = layer.stride
    N = T // S
    blocks_k = torch.stack(
        [layer.compress_k(k_raw[:, :, j * S : (j + 1) * S].mean(2).reshape(B, Hkv * D)) for j in range(N)]
    )
    blocks_v = torch.stack(
        [layer.compress_v(v[:, :, j * S : (j + 1) * S].mean(2).reshape(B, Hkv * D)) for j in range(N)]
    )
    blocks_k = blocks_k.view(N, B, Hkv, D).permute(1, 2, 0, 3)  # [N, B, E] -> [B, Hkv, N, D]
    blocks_v = blocks_v.view(N, B, Hkv, D).permute(1, 2, 0, 3)
    cos, sin = ctx.rotary((torch.arange(N) * S + S // 2)[None].expand(B, N), blocks_k.dtype)
    return apply_rotary(blocks_k, cos, sin), blocks_v


def ablation_call(spec: str, data_seed: int):
    """One forward of a tiny model built by `spec` on [2, 37] random tokens -> (first CSA layer, its output, and
    from its own projections q, k (RoPE'd), v, gate and the reference blocks)."""
    ids = torch.randint(0, 100, (2, 37), generator=torch.Generator().manual_seed(data_seed))
    layer, x, ctx, got = csa_layer_call(build(spec), ids)
    with torch.no_grad():
        q, k, k_raw, v, gate = layer.project(x, ctx.cos, ctx.sin)
        return (layer, got, q, k, v, gate, *reference_blocks(layer, ctx, k_raw, v))


def test_joint_softmax_ablation_equals_a_per_query_reference():
    """`csa_blend=joint`: each query's one softmax over its window (the last W positions, itself included) and the
    compressed blocks that end at or before it, blocks pooled, compressed and RoPE'd as the CSA layer does; written
    here query by query with explicit key lists."""
    layer, got, q, k, v, gate, blocks_k, blocks_v = ablation_call("csa_blend=joint,csa_window=8", data_seed=1)
    B, _, T, _ = q.shape
    S, W, G, N = layer.stride, layer.window, layer.num_groups, blocks_k.shape[2]
    with torch.no_grad():
        out = torch.zeros_like(q)
        for b in range(B):
            for h in range(layer.num_heads):
                for t in range(T):
                    window = range(max(0, t - W + 1), t + 1)
                    done = [j for j in range(N) if S * (j + 1) <= t]
                    keys = torch.stack([k[b, h // G, s] for s in window] + [blocks_k[b, h // G, j] for j in done])
                    values = torch.stack([v[b, h // G, s] for s in window] + [blocks_v[b, h // G, j] for j in done])
                    out[b, h, t] = torch.softmax(keys @ q[b, h, t] * layer.scaling, 0) @ values
        want = layer.o_proj(out.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_shared_init_full_attention_equals_csa_window_alone_over_the_whole_sequence():
    """The paired pattern ablation: Qwen3.5's pattern started from the default's weights (`init.shared_from_default`)
    computes what the default model computes with its CSA layers cut to their local window (`csa_blend=local`) over
    the whole sequence (`csa_window` >= T): the two differ only in those layers' mixers, and in nothing else."""
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(2))
    for seed in (0, 3):
        full = build("pattern=linear/linear/full/full,init.shared_from_default=1", seed)
        window = build("csa_blend=local,csa_window=64", seed)
        default = build("", seed)
        with torch.no_grad():
            torch.testing.assert_close(full(ids).logits, window(ids).logits, rtol=1e-9, atol=1e-9)
            # and the default (compressed path blended in) is another function of the same weights
            assert (default(ids).logits - full(ids).logits).abs().max() > 1e-3


def test_blend_bias_keeps_the_seed_gate_weights_and_starts_the_gate_at_sigmoid_of_the_bias():
    """The default (`csa_blend_bias=-4`) and the seed's bias-free gate (`csa_blend_bias=null`) differ at one seed
    by the bias alone (paired runs); `init.blend_bias` is the same field under its session-10 name."""
    seed_gate, biased = build("csa_blend_bias=null", 5), build("", 5)
    same, renamed = biased.state_dict(), build("init.blend_bias=-4", 5).state_dict()
    assert same.keys() == renamed.keys() and all(torch.equal(same[k], renamed[k]) for k in same)
    want, got = seed_gate.state_dict(), biased.state_dict()
    extra = sorted(set(got) - set(want))
    assert extra == ["model.layers.2.mixer.blend_proj.bias"], extra
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert torch.all(got[extra[0]] == -4.0)
    # the bias trains: the run's optimizer (built after the model, as in `train_run`) holds it, without decay
    from llamathink.train.optim import build_optimizer
    from llamathink.train.pretrain import RunConfig

    optimizer = build_optimizer(biased, RunConfig())
    bias = dict(biased.named_parameters())[extra[0]]
    (group,) = [g for g in optimizer.param_groups if any(p is bias for p in g["params"])]
    assert not group["use_muon"] and group["weight_decay"] == 0


def test_selection_ablation_equals_a_per_query_reference():
    """`csa_blend=select`: each query's one softmax over its window, the raw tokens of the `csa_select` blocks
    outside its window with the largest compressed-attention probability summed over its kv head's query group
    (Native Sparse Attention's choice), and the compressed blocks; written here query by query."""
    spec = "csa_blend=select,csa_select=3,csa_window=8"
    layer, got, q, k, v, gate, blocks_k, blocks_v = ablation_call(spec, data_seed=4)
    B, _, T, _ = q.shape
    S, W, G, N = layer.stride, layer.window, layer.num_groups, blocks_k.shape[2]
    with torch.no_grad():
        out = torch.zeros_like(q)
        n_selected = []
        for b in range(B):
            for kv in range(layer.num_kv_heads):
                for t in range(T):
                    done = [j for j in range(N) if S * (j + 1) <= t]
                    importance = {j: 0.0 for j in done}
                    for h in range(kv * G, (kv + 1) * G):
                        p = (
                            torch.softmax(
                                torch.stack([blocks_k[b, kv, j] @ q[b, h, t] for j in done]) * layer.scaling, 0
                            )
                            if done
                            else []
                        )
                        for j, pj in zip(done, p):
                            importance[j] += float(pj)
                    outside = sorted((j for j in done if j * S <= t - W), key=lambda j: -importance[j])[:3]
                    n_selected.append(len(outside))
                    raw = sorted(set(range(max(0, t - W + 1), t + 1)) | {j * S + i for j in outside for i in range(S)})
                    keys = torch.stack([k[b, kv, s] for s in raw] + [blocks_k[b, kv, j] for j in done])
                    values = torch.stack([v[b, kv, s] for s in raw] + [blocks_v[b, kv, j] for j in done])
                    for h in range(kv * G, (kv + 1) * G):
                        out[b, h, t] = torch.softmax(keys @ q[b, h, t] * layer.scaling, 0) @ values
        want = layer.o_proj(out.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate))
    assert max(n_selected) == 3 and min(n_selected) == 0  # late queries choose 3 of many blocks, early ones none
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "spec",
    [
        "csa_blend=mixed",
        "model=hf-llama,csa_blend=local",
        "init.blend_bias=-4,model=hf-llama",
        "csa_select=4",
        "csa_blend=select,csa_select=0",
        "csa_blend=select,csa_select=2.5",
        "csa_blend=local,init.blend_bias=-4",
        "csa_blend=joint,csa_blend_bias=-4",
        "init.blend_bias=-4,csa_blend_bias=-2",
    ],
)
def test_bad_ablation_specs_are_refused_by_name(spec):
    with pytest.raises(ValueError, match="csa_blend|csa_select|llamathink only|one setting"):
        bq.parse_run(f"r:{spec}")


def test_a_null_blend_bias_is_the_seed_gate_under_either_name():
    """`init.blend_bias=null` and `csa_blend_bias=null` are the seed's gate: no bias, and allowed beside
    `csa_blend=local` (which has no gate), as a number is not."""
    for spec in ("init.blend_bias=null", "csa_blend_bias=null"):
        assert not any(name.endswith("blend_proj.bias") for name in build(spec).state_dict())
        bq.parse_run(f"r:{spec},csa_blend=local")


def test_blend_bias_without_csa_layers_is_refused():
    with pytest.raises(ValueError, match="needs CSA layers"):
        build("pattern=linear/full,init.blend_bias=-4")


def test_profile_kernel_kinds_sorts_kernels_by_kind():
    """`profile_gpu.kernel_kinds`, behind BENCHMARKS.md section 1's table of GPU time by kind: kernel names as
    cuBLAS, cuDNN, inductor, fla and tilelang give them land in their kind (inductor's fused kernels before the
    attention and fla name patterns, which inductor's names can contain; its FlexAttention templates apart), CPU
    events and inductor's graph ranges are left out, and the shares add up."""
    from types import SimpleNamespace

    import profile_gpu

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [
        ("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN", 4000.0, cuda),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", 2000.0, cuda),
        ("triton_poi_fused__to_copy_chunk_mul_silu_0", 600.0, cuda),  # inductor, though it names a chunk
        ("triton_poi_fused__scaled_dot_product_cudnn_attention_backward_clone_mul_0", 400.0, cuda),  # and attention
        ("triton_tem_fused_flex_attention_0", 100.0, cuda),
        ("chunk_gated_delta_rule_fwd_kernel_h_blockdim64", 1500.0, cuda),
        ("kernel_kernel", 500.0, cuda),  # tilelang's
        ("causal_conv1d_bwd_kernel", 500.0, cuda),
        ("void at::native::vectorized_elementwise_kernel<4>", 250.0, cuda),
        ("mystery", 150.0, cuda),
        ("aten::mm", 9999.0, cpu),
        ("## Call CompiledFxGraph fzzgkwwz2l4q ##", 9999.0, cuda),  # a range record_shapes puts on the GPU
    ]
    averages = [SimpleNamespace(key=k, self_device_time_total=us, count=2, device_type=d) for k, us, d in events]
    rows = {
        line[:44].strip(): float(line[44:].split("ms")[0])
        for line in profile_gpu.kernel_kinds(averages).splitlines()[1:]
    }
    assert rows == {
        "matrix products (cuBLAS/CUTLASS)": 4.0,
        "attention (SDPA: cuDNN/flash/efficient)": 2.0,
        "inductor fused (triton_*)": 1.0,
        "FlexAttention (inductor)": 0.1,
        "fla Gated DeltaNet (Triton, tilelang)": 2.0,
        "fla causal conv": 0.5,
        "aten elementwise / reductions": 0.25,
        "other": 0.15,
    }
    assert "40.0%" in profile_gpu.kernel_kinds(averages).splitlines()[1]


def test_bench_csa_lists_a_layers_kernels_by_kind_and_by_time_with_what_they_fuse(capsys):
    """`bench_csa.py --kernels N`: one layer call's GPU kernels by kind, then the N with the most time, longest
    first, each inductor kernel followed by every graph's FX nodes it fuses (a name two graphs define, both), CPU
    events and inductor's graph ranges left out; a negative count is refused with the option named."""
    from types import SimpleNamespace

    import bench_csa

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [
        ("triton_poi_fused_where_0", 300.0, cuda),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", 900.0, cuda),
        ("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN", 500.0, cuda),
        ("triton_red_fused_scatter_add_1", 200.0, cuda),
        ("aten::mm", 9999.0, cpu),
        ("## Call CompiledFxGraph fzzgkwwz2l4q ##", 9999.0, cuda),
    ]
    averages = [SimpleNamespace(key=k, self_device_time_total=us, count=3, device_type=d) for k, us, d in events]
    origins = {
        "triton_poi_fused_where_0": [("0_forward", "mask, allowed"), ("0_backward", "where")],
        "triton_red_fused_scatter_add_1": [("0_forward", "sums")],
    }
    text = bench_csa.kernels_text(averages, 3, origins).splitlines()
    assert text[0] == "GPU ms by kind of kernel:" and "attention (SDPA" in text[1] and "0.90 ms" in text[1]
    top = text[text.index("the 3 kernels with the most time (ms, launches, name):") + 1 :]
    assert [line.split()[-1] for line in top if not line.lstrip().startswith("<-")] == [
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop",
        "nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN",
        "triton_poi_fused_where_0",
    ]
    assert top[0].split()[:2] == ["0.900", "3"]
    assert top[-2:] == ["      <- 0_forward: [mask, allowed]", "      <- 0_backward: [where]"]
    assert "scatter_add" not in "\n".join(top)  # fourth by time: past the three asked for
    with pytest.raises(SystemExit):
        bench_csa.main(["--kernels", "-1"])
    assert "--kernels: a count of kernels, 0 or more (got -1)" in capsys.readouterr().err


def test_profile_gpu_refuses_a_model_it_would_not_profile_as_named(capsys):
    """`profile_gpu.py --model`: a misspelt variant, a peer, or a variant that changes how bench_gpu runs a model
    rather than the model (`:cold`) stops before any GPU work, naming the problem."""
    import profile_gpu

    for argv, expected in (
        (["--model", "llamathink:auto:no-hx"], "unknown variant 'no-hx'"),
        (["--model", "hf-llama"], "profiles a LlamaThink model"),
        (["--model", "llamathink:auto:cold"], "only those of the model itself"),
        (["--peers", "hf-lama"], "unknown model"),
        (["--inductor-option", "max_complex_cat=1"], "not KEY=VALUE with KEY one of torch._inductor.config"),
        (["--inductor-option", "coordinate_descent_tuning"], "not KEY=VALUE"),
        (["--inductor-option", "coordinate_descent_tuning=True"], "add --compile"),
        (["--eager-ops"], "add --compile"),
        (["--inductor-option", "os=1"], "not KEY=VALUE with KEY one of"),
        (["--inductor-option", "max_autotune=1"], "max_autotune wants a value of type bool"),
        (["--inductor-option", "coordinate_descent_tuning=true"], "of type bool"),
        (["--inductor-option", "max_pointwise_cat_inputs=True"], "of type int"),
        (["--optimizer-only", "--compile", "--eager-ops"], "not --optimizer-only"),
        (["--kernel-sources"], "add --compile"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            profile_gpu.main(argv)
        assert expected in str(exit_info.value.code) + capsys.readouterr().err


# Lines of inductor's generated code as an H200 run wrote them (docs/results/h200_s31/c1/code_b16.log.gz), cut short
_GDN_FORWARD = """# AOT ID: ['0_forward']
from ctypes import c_void_p, c_long, c_int
# kernel path: /tmp/kcache/inductor/3d/c3dsypniyy7sgqmvqt3scu5nhgafixsdmu6rbryaq35r2yld4m3o.py
# Topologically Sorted Source Nodes: [add, rms_norm, qkv], Original ATen: [aten.add, aten._fused_rms_norm, aten._to_copy]
# Source node to ATen node mapping:
#   add => add
triton_per_fused__fused_rms_norm__to_copy_add_0 = async_compile.triton('triton_per_fused__fused_rms_norm__to_copy_add_0', '''
'''
# Topologically Sorted Source Nodes: [qkv, weight, qkv_1], Original ATen: [aten._unsafe_view, aten.select, llamathink.fla_causal_conv1d_silu]
triton_poi_fused__unsafe_view_fla_causal_conv1d_silu_select_2 = async_compile.triton('triton_poi_fused__unsafe_view_fla_causal_conv1d_silu_select_2', '''
'''
triton_poi_fused_0 = async_compile.triton('triton_poi_fused_0', '''
'''
"""
_CSA_FORWARD = """# AOT ID: ['1_forward']
# Topologically Sorted Source Nodes: [add, rms_norm, linear], Original ATen: [aten.add, aten._fused_rms_norm, aten._to_copy]
triton_per_fused__fused_rms_norm__to_copy_add_0 = async_compile.triton('triton_per_fused__fused_rms_norm__to_copy_add_0', '''
'''
"""


def test_profile_gpu_traces_inductor_kernels_to_their_graph_and_model_lines():
    """`profile_gpu.kernel_origins` reads inductor's generated code, as collected or as a TORCH_LOGS=output_code log
    (each line prefixed): each kernel's graph (AOT ID) and the model lines it fuses, a name that two graphs define
    under both, a kernel without a source comment with none. `inductor_ms_by_graph` splits a shared name's time
    evenly, skips the graphs it is told to, matches a name the tables cut at 150 characters by its prefix, sums
    inductor's kernels of no graph apart and leaves out other kernels."""
    import profile_gpu

    as_logged = "\n".join(
        f"V1202 16:03:03.605000 690 torch/_inductor/graph.py:2552] [1/0] [__output_code] {line}"
        for line in _CSA_FORWARD.splitlines()
    )
    assert profile_gpu.kernel_origins([as_logged]) == profile_gpu.kernel_origins([_CSA_FORWARD])
    origins = profile_gpu.kernel_origins([_GDN_FORWARD, _CSA_FORWARD])
    assert origins == {
        "triton_per_fused__fused_rms_norm__to_copy_add_0": [
            ("0_forward", "add, rms_norm, qkv"),
            ("1_forward", "add, rms_norm, linear"),
        ],
        "triton_poi_fused__unsafe_view_fla_causal_conv1d_silu_select_2": [("0_forward", "qkv, weight, qkv_1")],
        "triton_poi_fused_0": [("0_forward", "")],
    }
    kernels = [
        ("triton_per_fused__fused_rms_norm__to_copy_add_0", 0.5),
        ("triton_poi_fused__unsafe_view_fla_causal_conv1d_silu_select_2", 0.25),
        ("triton_poi_fused_0", 1.0),
        ("triton_poi_fused_7", 0.125),  # compiled before the code was collected
        ("nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN", 9.0),
    ]
    assert profile_gpu.inductor_ms_by_graph(kernels, origins) == {
        "0_forward": 1.5,
        "1_forward": 0.25,
        "(no graph)": 0.125,
    }
    assert profile_gpu.inductor_ms_by_graph(kernels, origins, skip=("1_forward",)) == {
        "0_forward": 1.75,
        "(no graph)": 0.125,
    }
    long_name = "triton_poi_fused_" + "_".join(["add_mul_view"] * 14) + "_3"
    origins[long_name] = [("2_backward", "")]
    assert profile_gpu.inductor_ms_by_graph([(long_name[:150], 2.0)], origins) == {"2_backward": 2.0}
    assert profile_gpu.inductor_ms_by_graph([("triton_poi_fused_", 2.0)], origins) == {"(no graph)": 2.0}


def test_profile_gpu_lists_the_configuration_inductor_kept_for_each_kernel(tmp_path):
    """`profile_gpu.inductor_autotune_picks` on generated modules as torch loads them (a graph's module, whose file
    starts with its AOT ID, and a kernel's own module holding the same autotuner object), with stand-ins of torch's
    `CachingAutotuner`, whose `configs` torch drops once compiled: the kept configuration and how it was chosen
    (timed among N, with the times measured, fastest first; inductor's cached pick; the only config), once per
    kernel object under its graph; one name defined by two graphs listed for both; a kernel not launched yet (several launchers) left out; a kernel it
    cannot read left out without losing the others; modules it cannot read give nothing rather than an error."""
    import types

    import profile_gpu

    def autotuner(launched, configs=3, state="miss", **kwargs):
        config = types.SimpleNamespace(kwargs=kwargs, num_warps=8, num_stages=1)
        launchers = [types.SimpleNamespace(config=config)] * (1 if launched else 2)
        info = (
            {"autotune_cache_state": state, "num_configs": configs}
            if state == "miss"
            else {"autotune_cache_state": state}
        )
        # as torch leaves it: `configs` dropped (None) once compiled, the count in the cache info where timed
        return types.SimpleNamespace(launchers=launchers, configs=None, autotune_cache_info=info)

    def module(name, first_line, **kernels):
        path = tmp_path / f"{name}.py"
        path.write_text(first_line + "\n")
        return types.SimpleNamespace(__file__=str(path), **kernels)

    norm = autotuner(True, R0_BLOCK=128, XBLOCK=8)
    # torch's autotuner keeps the candidates' measured times (ms) on its coordinate-descent tuner
    kept = (("R0_BLOCK", 128), ("XBLOCK", 8), ("num_warps", 8), ("num_stages", 1))  # `triton_config_to_hashable`
    other = (("R0_BLOCK", 8), ("XBLOCK", 64), ("num_warps", 4), ("num_stages", 1))
    norm.coordesc_tuner = types.SimpleNamespace(cached_benchmark_results={other: 0.0903, kept: 0.02534, "c": 0.021})
    picks = profile_gpu.inductor_autotune_picks(
        [
            module("kernel_file", "import triton", triton_per_fused_2=norm),  # the kernel's own module first
            module(
                "graph0",
                "# AOT ID: ['0_forward']",
                triton_per_fused_2=norm,
                triton_poi_fused_0=autotuner(True, configs=1, state="only 1 config", XBLOCK=1024),
                triton_red_fused_3=autotuner(False, XBLOCK=1),
                aten=torch.ops.aten,
            ),
            module(
                "graph2",
                "# AOT ID: ['2_forward']",
                triton_per_fused_2=autotuner(True, configs=2, state="hit", XBLOCK=32, R0_BLOCK=128),
            ),
        ]
    )
    assert picks == {
        "triton_per_fused_2": [
            "0_forward: R0_BLOCK=128, XBLOCK=8, num_warps=8, num_stages=1 (of 3 configs; timed 21.0, 25.3*, 90.3 us)",
            "2_forward: R0_BLOCK=128, XBLOCK=32, num_warps=8, num_stages=1 (cached pick)",
        ],
        "triton_poi_fused_0": ["0_forward: XBLOCK=1024, num_warps=8, num_stages=1 (only config)"],
    }
    broken = autotuner(True, XBLOCK=8)
    broken.launchers = [types.SimpleNamespace()]  # no config: left out, the others still listed
    uncounted = autotuner(True, XBLOCK=4)
    uncounted.autotune_cache_info = None  # no cache info: only config (configs dropped)
    mixed = module("graph9", "", triton_poi_fused_9=broken, triton_poi_fused_8=uncounted)
    assert profile_gpu.inductor_autotune_picks([mixed]) == {
        "triton_poi_fused_8": ["?: XBLOCK=4, num_warps=8, num_stages=1 (only config)"]
    }
    assert profile_gpu.inductor_autotune_picks([object(), types.SimpleNamespace(__file__=None)]) == {}


def test_profile_gpu_kernel_origins_read_this_torchs_generated_code():
    """`kernel_origins` on code this torch's inductor generates (on the CPU: C++ kernels, no source comments): every
    kernel of a compiled forward and backward is found, under its graph's AOT ID."""
    import profile_gpu
    from torch._inductor.utils import run_and_get_code

    def loss(x, w):
        return torch.sigmoid(torch.nn.functional.rms_norm(x, (x.shape[-1],)) * w).sum()

    x, w = torch.randn(8, 64, requires_grad=True), torch.randn(64, requires_grad=True)
    compiled = torch.compile(loss)
    _, sources = run_and_get_code(lambda: compiled(x, w).backward())
    origins = profile_gpu.kernel_origins(sources)
    defined = [name for code in sources for name in re.findall(r"^(\w+) = async_compile\.", code, re.MULTILINE)]
    assert defined and sorted(origins) == sorted(set(defined))
    assert {graph for places in origins.values() for graph, _ in places} == {"0_forward", "0_backward"}


def test_kernels_by_graph_reproduces_session_31s_per_layer_figures(capsys):
    """`benchmarks/kernels_by_graph.py` on the raw files of BENCHMARKS.md section 1's session-31 table (H200, batch
    16 and 64): inductor's ms by graph as published (Gated DeltaNet graphs 0_*, CSA 1_*, full attention 2_*, the
    loss 3_inference; HF Llama's own graph 4_* skipped at batch 64, and alone in its own list); a report without
    the asked-for list, or a missing file, is refused by name."""
    import kernels_by_graph

    raw = REPO_ROOT / "docs" / "results" / "h200_s31" / "c1"

    def by_graph(*argv):
        assert kernels_by_graph.main([str(a) for a in argv]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        return {name: float(ms) for name, ms in rows}

    b16 = by_graph(raw / "kinds_b16.txt", raw / "code_b16.log.gz")
    kinds = {k: sum(v for g, v in b16.items() if g.startswith(k)) for k in ("0_", "1_", "2_", "3_")}
    assert kinds == pytest.approx({"0_": 7.79, "1_": 3.95, "2_": 2.26, "3_": 1.13}, abs=0.006) and b16["sum"] == 15.127
    b64 = by_graph(raw / "kinds_b64.txt", raw / "code_b64.log.gz", "--skip", "4_forward,4_backward")
    kinds = {k: sum(v for g, v in b64.items() if g.startswith(k)) for k in ("0_", "1_", "2_", "3_")}
    assert kinds == pytest.approx({"0_": 27.64, "1_": 13.9, "2_": 8.08, "3_": 4.56}, abs=0.006)
    assert b64["sum"] == 54.177
    ours = ",".join(f"{i}_{part}" for i in range(3) for part in ("forward", "backward")) + ",3_inference"
    llama = by_graph(raw / "kinds_b64.txt", raw / "code_b64.log.gz", "--table", "2", "--skip", ours)
    assert set(llama) == {"4_forward", "4_backward", "sum"} and llama["sum"] == 32.101
    for argv, expected in (
        ([raw / "kinds_b16.txt", raw / "code_b16.log.gz", "--table", "2"], "has 1 kernel list(s), not 2"),
        ([raw / "missing.txt", raw / "code_b16.log.gz"], "missing.txt"),
    ):
        with pytest.raises(SystemExit):
            kernels_by_graph.main([str(a) for a in argv])
        assert expected in capsys.readouterr().err


def test_profile_gpu_inductor_options_are_read_as_python_literals():
    """`profile_gpu.py --inductor-option KEY=VALUE`: the value as a Python literal where it is one (a bool, a number),
    else as the string, for an option torch._inductor.config has."""
    import profile_gpu

    assert profile_gpu.inductor_option("coordinate_descent_tuning=True") == ("coordinate_descent_tuning", True)
    assert profile_gpu.inductor_option("max_pointwise_cat_inputs=4") == ("max_pointwise_cat_inputs", 4)
    assert profile_gpu.inductor_option("cuda_backend=triton") == ("cuda_backend", "triton")


def test_zero_residual_outputs_start_every_layer_as_the_identity():
    """`init.residual_out=0` zeroes exactly the projections that write into the residual stream (o_proj, out_proj,
    down_proj, 4 layers x 2), every other tensor as without it at the same seed (TINY: a normal start); each decoder
    layer then returns its input, so the final hidden state is the final norm of the embedding."""
    default, zeroed = build(""), build("init.residual_out=0")
    outs = [n for n in zeroed.state_dict() if n.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight"))]
    assert len(outs) == 8
    for name, tensor in zeroed.state_dict().items():
        if name in outs:
            assert not tensor.any(), name
        else:
            assert torch.equal(tensor, default.state_dict()[name]), name
    ids = torch.randint(0, 100, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = zeroed.model(ids, use_cache=False).last_hidden_state
        expected = zeroed.model.norm(zeroed.model.embed_tokens(ids))
        assert not torch.allclose(default.model(ids, use_cache=False).last_hidden_state, expected)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-12)


def test_the_default_zero_start_is_the_measured_init_residual_out_zero():
    """Session 18 measured the zero start as `init.residual_out=0` on the normal start; the default built from the
    config field (`zero_init_residual` unset) is that model, tensor for tensor, at each seed."""
    for seed in (0, 1):
        measured, default = build("init.residual_out=0", seed).state_dict(), build("zero_init_residual=null", seed)
        assert measured.keys() == default.state_dict().keys()
        for name, tensor in default.state_dict().items():
            assert torch.equal(tensor, measured[name]), (seed, name)


def test_residual_out_std_is_the_drawn_std():
    model = build("init.residual_out=0.05,intermediate_size=512,hidden_size=256")
    std = torch.cat([m.weight.flatten() for m in model.modules() if getattr(m, "_is_residual_out", False)]).std()
    assert abs(std.item() - 0.05) < 0.002


def _quality_json(path, runs, steps=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"settings": {"steps": steps, "batch": 2, "seq": 8}, "versions": {"gpu": "test"}, "runs": runs}
    path.write_text(json.dumps(doc))
    return path


def _run(name, losses, step=2, seconds=1.0):
    curve = [
        {"step": step * (i + 1), "tokens": 16 * step * (i + 1), "seconds": seconds * (i + 1), "val_loss": v}
        for i, v in enumerate(losses)
    ]
    return {"name": name, "model": "llamathink", "curve": curve, "val_loss": losses[-1], "test_loss": losses[-1] + 1}


def test_plots_merge_files_rename_runs_and_average_seeds(tmp_path, capsys):
    """`--plot A B`: the runs of both files in one plot (each knows its file), `--plot-runs` keeps the whole names
    its regular expression matches, `--plot-label` renames by regular expression, `--plot-mean-seeds` averages
    `-s<seed>` runs over the steps they share; one name from two files is told apart in the legend."""
    a = _quality_json(tmp_path / "a" / "quality.json", [_run("lt-s0", [4.0, 3.0]), _run("x", [5.0, 4.0])])
    b = _quality_json(tmp_path / "b" / "quality.json", [_run("old-s1", [3.0, 2.0, 1.0], step=1), _run("x", [6.0, 5.0])])
    merged = bq.merge_results([a, b])
    assert [(r["name"], r["file_index"]) for r in merged["runs"]] == [("lt-s0", 1), ("x", 1), ("old-s1", 2), ("x", 2)]
    out = tmp_path / "plot.png"
    argv = ["--plot", str(a), str(b), "--plot-runs", r"(lt|old)-s\d{1,2}", "--plot-label", r"old-(s\d)=lt-\1"]
    assert bq.main([*argv, "--plot-mean-seeds", "--plot-out", str(out)]) == 0
    assert out.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "lt (2 seeds)" in printed and "\nx" not in printed
    nested = tmp_path / "new" / "folder" / "x.png"  # a folder that does not exist yet is made
    assert bq.main(["--plot", str(a), str(b), "--plot-runs", "x", "--plot-out", str(nested)]) == 0
    assert "x [file 1]" in capsys.readouterr().out and nested.stat().st_size > 0
    mean = bq.mean_over_seeds(
        {"settings": {"steps": 4}, "runs": [_run("lt-s0", [4.0, 3.0]), _run("lt-s1", [3.0, 2.0, 1.0, 1.0], step=1)]}
    )["runs"]
    assert len(mean) == 1 and mean[0]["seeds"] == 2
    assert [(p["step"], p["val_loss"]) for p in mean[0]["curve"]] == [(2, 3.0), (4, 2.0)]
    assert mean[0]["val_loss"] == 2.0 and mean[0]["test_loss"] == 3.0


def test_plots_refuse_what_would_draw_a_wrong_line(tmp_path, capsys):
    """A file that is not a results file, another run length, a bad regular expression or label, a seed given twice
    (the same file twice) and a run that stopped early are each refused by name, never averaged or drawn."""
    a = _quality_json(tmp_path / "a" / "quality.json", [_run("lt-s0", [4.0, 3.0])])
    stopped = {**_run("lt-s1", [4.0]), "steps_done": 2}
    b = _quality_json(tmp_path / "b" / "quality.json", [stopped])
    c = _quality_json(tmp_path / "c" / "quality.json", [_run("y", [1.0])], steps=8)
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "empty.json").write_text("")
    cases = [
        ([str(a), str(c)], [], r"c/quality.json: steps=8 but .*a/quality.json has 4"),
        ([str(a), str(tmp_path / "list.json")], [], r"list.json: not a quality.json"),
        ([str(tmp_path / "empty.json")], [], r"empty.json: cannot be read as a quality.json"),
        ([str(tmp_path / "missing.json")], [], r"missing.json: cannot be read"),
        ([str(a)], ["--plot-runs", "lt-s("], r"--plot-runs 'lt-s\(' is not a regular expression"),
        ([str(a)], ["--plot-runs", "nothing"], "matches no run"),
        ([str(a)], ["--plot-label", "lt-s0"], "is not PATTERN=LABEL"),
        ([str(a)], ["--plot-label", r"lt-(s\d)=\2"], r"--plot-label .*invalid group reference"),
        ([str(a), str(a)], ["--plot-mean-seeds"], r"lt s0 is given twice"),
        ([str(a), str(b)], ["--plot-mean-seeds"], r"'lt-s1' .*b/quality.json\) did not train 4 steps"),
    ]
    for files, extra, message in cases:
        with pytest.raises(SystemExit):
            bq.main(["--plot", *files, *extra, "--plot-out", str(tmp_path / "x.png")])
        assert re.search(message, capsys.readouterr().err), (files, extra, message)
    assert not (tmp_path / "x.png").exists()


def test_runs_compile_with_combo_kernels_and_the_compile_mode_training_uses():
    """A LlamaThink run compiles with combo kernels unless told not to (the run setting `combo_kernels`' default)
    and with `compile_mode` auto (training's default: CUDA graphs on a GPU); the peers as torch.compile compiles
    them, unless told otherwise. A mode other than auto or default without compile=1 is an error."""
    assert bq.parse_run("r:compile=1")["combo_kernels"] is True
    assert bq.parse_run("r:compile=1,combo_kernels=0")["combo_kernels"] is False
    assert bq.parse_run("r:model=hf-llama,compile=1")["combo_kernels"] is False
    assert bq.parse_run("r:model=hf-llama,compile=1,combo_kernels=1")["combo_kernels"] is True
    assert bq.parse_run("r:compile=1")["compile_mode"] == "auto"
    assert bq.parse_run("r:compile=0")["compile_mode"] == "auto"  # accepted, not used
    assert bq.parse_run("r:model=hf-llama,compile=1")["compile_mode"] == "default"
    assert bq.parse_run("r:model=hf-llama,compile=1,compile_mode=reduce-overhead")["compile_mode"] == "reduce-overhead"
    with pytest.raises(ValueError, match="compile_mode needs compile=1"):
        bq.parse_run("r:compile_mode=reduce-overhead")
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        bq.parse_run("r:compile=1,compile_mode=fast")


def test_csa_flex_0_keeps_every_csa_layer_on_its_sdpa_paths():
    """`csa_flex=0` turns FlexAttention off in every CSA layer (`flex_window`), and only there; a peer refuses it."""

    def flex(model):
        return [m.uses_flex_window(torch.device("cuda")) for m in model.modules() if hasattr(m, "flex_window")]

    assert flex(build("")) == [True]
    assert flex(build("csa_flex=1")) == [True]
    assert flex(build("csa_flex=0")) == [False]
    with pytest.raises(ValueError, match="llamathink only"):
        bq.parse_run("r:model=hf-llama,csa_flex=0")


def test_a_compiled_run_takes_the_mode_training_resolves(tmp_path, monkeypatch):
    """`train_run` compiles a LlamaThink run with the mode `compile_mode: auto` resolves to for it
    (`resolve_compile_mode`, given the run's facts: torch.compile's default mode on this CPU; CUDA graphs on a GPU,
    as the device is faked below, unless rows are document-masked), and the record names it. dynamo's "eager" backend stands in for inductor."""
    from llamathink.data import LocalSource, prepare
    from llamathink.modeling_llamathink import LlamaThinkPreTrainedModel
    from llamathink.tokenizer_utils import sample_data_path

    data = tmp_path / "data"
    prepare(LocalSource([str(sample_data_path("prose.jsonl"))]), data, "builtin", val_docs=4, progress=False)
    val = np.random.default_rng(0).integers(0, 1000, (2, 33)).astype(np.int64)
    args = types.SimpleNamespace(
        data=str(data), seq=32, batch=2, data_seed=0, steps=2, warmup=1, eval_every=2, eval_batch=2, speed_from=1,
        time_limit=None, seed=0, muon_lr=0.02, adamw_lr=0.002, weight_decay=0.0, grad_clip=1.0,
    )  # fmt: skip
    modes = []
    compile_layers = LlamaThinkPreTrainedModel.compile_layers
    monkeypatch.setattr(
        LlamaThinkPreTrainedModel,
        "compile_layers",
        lambda self, **kw: modes.append(kw) or compile_layers(self, backend="eager"),
    )
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    small = "hidden_size=64,intermediate_size=128,num_hidden_layers=2,vocab_size=1024,pattern=linear/full"
    run = bq.parse_run(f"r:compile=1,{small}")
    record = bq.train_run(run, args, val, val, torch.device("cpu"))
    assert (
        modes == [{"options": {"inplace_buffers": False, "combo_kernels": True}}]
        and record["torch_compile_mode"] == "default"
    )
    resolve, seen = bq.resolve_compile_mode, []

    def on_a_gpu(mode, device, **kw):
        seen.append(kw)
        return resolve(mode, torch.device("cuda"), **kw)

    monkeypatch.setattr(bq, "resolve_compile_mode", on_a_gpu)
    torch._dynamo.reset()
    record = bq.train_run(run, args, val, val, torch.device("cpu"))
    assert seen == [{"num_processes": 1, "packed": False, "whole_model": False, "mixed_precision": "no"}]
    assert modes[1] == {"options": {"triton.cudagraphs": True, "inplace_buffers": False, "combo_kernels": True}}
    assert record["torch_compile_mode"] == "reduce-overhead" and math.isfinite(record["val_loss"])
    torch._dynamo.reset()  # document-masked rows change shape: the default mode, as in training
    record = bq.train_run(bq.parse_run(f"m:compile=1,document_masking=1,{small}"), args, val, val, torch.device("cpu"))
    assert seen[-1]["packed"] is True and record["torch_compile_mode"] == "default"
    assert modes[2] == {"options": {"inplace_buffers": False, "combo_kernels": True}}
    # the peers compile as torch.compile compiles them, unless given combo kernels (then training's options)
    peer = bq.parse_run("p:model=hf-llama,compile=1")
    assert peer["combo_kernels"] == 0 and bq.torch_compile_kwargs(peer, "default") == {"mode": "default"}
    combo = bq.parse_run("p:model=hf-llama,compile=1,combo_kernels=1")
    assert bq.torch_compile_kwargs(combo, "default") == {"options": {"inplace_buffers": False, "combo_kernels": True}}
    plain = bq.parse_run("l:compile=1,combo_kernels=0")
    assert bq.torch_compile_kwargs(plain, "default") == {"options": {"inplace_buffers": False}}


def test_tune_fla_configs_keeps_only_choices_this_process_would_take(tmp_path, monkeypatch):
    """`tune_fla_configs.py --keep-recorded` (as on a GPU with fla: both stood in for) refuses, before building any
    model, a `--out` that is missing, not a tuned-configs file, or measured on another GPU or with other fla or
    Triton versions (its choices would not be taken, and the file would be replaced by a partial tune), naming
    what differs; a matching file is handed to the loader (`LLAMATHINK_FLA_TUNED_CONFIGS`) before the model is
    built."""
    import json
    import os

    import tune_fla_configs

    import llamathink
    from llamathink import kernels_llamathink as kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(kernels, "fla_conv_available", lambda: True)
    monkeypatch.setattr(kernels, "_library_versions", lambda: {"fla": "0.6.0", "triton": "3.6.0"})
    monkeypatch.delenv("LLAMATHINK_FLA_TUNED_CONFIGS", raising=False)

    class Built(Exception):
        pass

    def no_model(*args, **kwargs):
        raise Built(os.environ.get("LLAMATHINK_FLA_TUNED_CONFIGS"))

    monkeypatch.setattr(llamathink, "LlamaThinkConfig", no_model)
    config = {"kwargs": {"BD": 32}, "num_warps": 4, "num_stages": 3, "num_ctas": 1, "maxnreg": None}

    def tuned(gpu="NVIDIA H200", fla="0.6.0", triton="3.6.0", num_warps=4):
        path = tmp_path / f"{gpu}-{fla}-{triton}-{num_warps}.json".replace(" ", "_")
        entry = {"key": [1008, 4, "torch.bfloat16"], "config": {**config, "num_warps": num_warps}}
        doc = {"gpu": gpu, "versions": {"fla": fla, "triton": triton}, "kernels": {"m:k": [entry]}}
        path.write_text(json.dumps({**doc, "format": kernels._TUNED_FORMAT}))
        return path

    def run(out):
        return tune_fla_configs.main(["--keep-recorded", "--batches", "16", "--out", str(out)])

    for out, message in (
        (tmp_path / "none.json", "no such file"),
        (tuned(gpu="NVIDIA H100 80GB HBM3"), "measured for NVIDIA H100 80GB HBM3 with"),
        (tuned(triton="3.5.1"), "'triton': '3.5.1'"),
        (tuned(fla="0.5.0"), "'fla': '0.5.0'"),
        (tuned(num_warps=0), r"damaged .*num_warps is 0"),
    ):
        before = out.read_bytes() if out.exists() else None
        with pytest.raises(SystemExit, match=message):
            run(out)
        assert (out.read_bytes() if out.exists() else None) == before  # nothing written
    (tmp_path / "model.json").write_text('{"model_type": "llamathink"}')
    with pytest.raises(SystemExit, match="is not a tuned-configs file"):
        run(tmp_path / "model.json")
    good = tuned()
    with pytest.raises(Built) as built:
        run(good)
    assert str(built.value) == str(good.resolve())
