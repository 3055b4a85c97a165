"""`benchmarks/bench_gpu.py`'s model names and numbers: every variant and number is checked before anything runs (a
misspelt variant would be measured as the plain model, a wrong batch list would fail in every measuring process),
and the measuring process's environment for `:cold` and `:untuned-fla`."""

import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_gpu as bg  # noqa: E402

from llamathink.modeling_llamathink import LlamaThinkCompressedSparseAttention  # noqa: E402


@pytest.mark.parametrize(
    "name",
    [
        "llamathink:fla",
        "llamathink:torch:no-hc:packed",
        "llamathink:fla:cold:untuned-fla",
        "hf-llama:cold",
        "llamathink:fla:no-combo:cudagraphs",
        "hf-llama:combo",
        "llamathink:fla:csa-chunk128",
        "llamathink:fla:cudagraphs:group1",
        "llamathink:fla:cudagraphs:group4:csa-chunk64",
        "llamathink:flash_qla:cudagraphs:loss-rows4096",
    ],
)
def test_known_model_names_pass(name):
    bg.check_model_name(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("llamathink:cold", "llamathink needs a backend first"),
        ("llamathink", "llamathink needs a backend first"),
        ("llamathink:fla:COLD", "unknown variant 'COLD' of llamathink"),
        ("llamathink:fla:cold ", "unknown variant 'cold ' of llamathink"),
        ("hf-llama:untuned-fla", "unknown variant 'untuned-fla' of hf-llama"),
        ("llamathink:fla:combo", "unknown variant 'combo' of llamathink"),  # its default: `:no-combo` turns it off
        ("hf-llama:no-combo", "unknown variant 'no-combo' of hf-llama"),
        ("hf-mistral", "unknown model"),
        ("llamathink:fla:csa-chunk0", "'csa-chunk0': csa-chunk<N> needs a positive integer N"),
        ("llamathink:fla:csa-chunk", "'csa-chunk': csa-chunk<N> needs a positive integer N"),
        ("llamathink:fla:csa-chunk064", "'csa-chunk064': csa-chunk<N> needs a positive integer N without leading"),
        ("llamathink:fla:csa-chunk128:csa-chunk64", "more than one csa-chunk<N> \\(csa-chunk128, csa-chunk64\\)"),
        (
            "llamathink:fla:chunk128",
            r"unknown variant 'chunk128' of llamathink \(.*csa-chunk<N>, group<N>, loss-rows<N>\)",
        ),
        ("hf-llama:csa-chunk128", "unknown variant 'csa-chunk128' of hf-llama"),
        ("llamathink:fla:group0", "unknown variant 'group0' of llamathink"),
        ("llamathink:fla:group04", "unknown variant 'group04' of llamathink"),
        ("llamathink:fla:group4:group2", r"more than one group<N> \(group4, group2\)"),
        ("llamathink:fla:whole:group4", "'group4' sets the layers per compiled region; 'whole' compiles one graph"),
        ("hf-llama:group4", "unknown variant 'group4' of hf-llama"),
        ("llamathink:fla:loss-rows0", "unknown variant 'loss-rows0' of llamathink"),
        ("llamathink:fla:loss-rows4096:loss-rows8192", r"more than one loss-rows<N> \(loss-rows4096, loss-rows8192\)"),
        ("hf-llama:loss-rows4096", "unknown variant 'loss-rows4096' of hf-llama"),
    ],
)
def test_wrong_model_names_stop_with_the_fault_named(name, message):
    with pytest.raises(SystemExit, match=message):
        bg.check_model_name(name)


def test_loss_rows_variant_gives_the_chunked_loss_its_rows_in_its_own_process_only(monkeypatch):
    """`:loss-rows<N>` makes the process's chunked loss take chunks of N rows (what `LlamaThinkForCausalLM.forward`
    calls), and `--in-process` refuses it: the patch would reach every model measured after it."""
    from llamathink import modeling_llamathink as modeling

    loss = modeling.chunked_causal_lm_loss
    monkeypatch.setattr(modeling, "chunked_causal_lm_loss", loss)  # restored after the test
    bg.build("llamathink:torch:loss-rows64")
    assert modeling.chunked_causal_lm_loss.func is loss and modeling.chunked_causal_lm_loss.keywords == {
        "chunk_rows": 64
    }
    argv = ["--models", "llamathink:fla,llamathink:fla:loss-rows4096", "--compiled-only", "--in-process"]
    with pytest.raises(SystemExit, match=r"cannot give llamathink:fla:loss-rows4096 a process of its own"):
        bg.main(argv)


def test_csa_chunk_variant_sets_the_local_chunk_of_every_csa_layer_only():
    """`:csa-chunk512` (whole windows of the seed's 512) on every CSA layer, no other layer touched; the plain model
    keeps the class default."""
    default = LlamaThinkCompressedSparseAttention.local_chunk
    assert default != 512
    model = bg.build("llamathink:torch:csa-chunk512")
    chunks = {layer.mixer_type: getattr(layer.mixer, "local_chunk", None) for layer in model.model.layers}
    assert chunks["csa"] == 512 and chunks["full"] is None and chunks["linear"] is None
    plain = bg.build("llamathink:torch")
    assert {layer.mixer.local_chunk for layer in plain.model.layers if layer.mixer_type == "csa"} == {default}


def test_cold_and_untuned_processes_get_their_own_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/warm/triton")
    monkeypatch.delenv("LLAMATHINK_FLA_TUNED_CONFIGS", raising=False)
    env = bg.subprocess_env("llamathink:fla:cold:untuned-fla", str(tmp_path))
    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TILELANG_CACHE_DIR"):
        assert env[var].startswith(str(tmp_path)), var
    assert env["LLAMATHINK_FLA_TUNED_CONFIGS"] == "0"
    plain = bg.subprocess_env("llamathink:fla", str(tmp_path))
    assert plain["TRITON_CACHE_DIR"] == "/warm/triton" and "LLAMATHINK_FLA_TUNED_CONFIGS" not in plain


def test_a_wrong_name_stops_the_command_before_anything_runs():
    with pytest.raises(SystemExit, match="unknown variant 'COLD'"):
        bg.main(["--models", "hf-llama,llamathink:fla:COLD"])  # on any machine, before the GPU is asked for


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train-batches", "16,y"], r"--train-batches: 'y' is not a positive batch size"),
        (["--train-batches", ","], r"--train-batches: no batch size given"),
        (["--generate-batches", "1,0"], r"--generate-batches: '0' is not a positive batch size"),
        (["--steps", "0"], r"--steps must be at least 1, got 0"),
        (["--warmup", "-1"], r"--warmup must be at least 1, got -1"),
        (["--peak-tflops", "0"], r"--peak-tflops must be a positive number, got 0.0"),
        (["--budget-s", "inf"], r"--budget-s must be a positive number, got inf"),
        (["--models", "llamathink:fla:cudagraphs"], r"'cudagraphs' changes only the compiled training measurement"),
        (["--models", "hf-llama:combo", "--no-train"], r"'combo' changes only the compiled training measurement"),
        (["--models", "llamathink:fla:whole", "--compiled-only", "--no-train"], r"'whole' changes only the compiled"),
        (["--models", "llamathink:fla:group4"], r"'group4' changes only the compiled training measurement"),
        (["--interleave", "-2"], r"--interleave must be a number of rounds \(at least 1; 0: off\), got -2"),
        (["--interleave", "3", "--compile", "--trace", "t"], r"--interleave .* leave out --compile, --trace"),
        (["--interleave", "3", "--models", "hf-llama,llamathink:fla:cold"], r"--interleave cannot give .*:cold"),
    ],
)
def test_numbers_and_compiled_variants_that_give_no_measurement_stop_the_command(argv, message):
    with pytest.raises(SystemExit, match=message):
        bg.main(argv)  # on any machine, before the GPU is asked for


def test_the_same_command_with_its_compiled_measurement_passes_the_checks(monkeypatch):
    monkeypatch.setattr(bg.torch.cuda, "is_available", lambda: False)  # stops right after the checks
    for argv in (["--models", "llamathink:fla:cudagraphs", "--compiled-only"], ["--train-batches", "16, 64"]):
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bg.main(argv)


def test_interleaved_rows_take_turns_and_give_each_rounds_ratio_under_drift(monkeypatch):
    """`bench_interleaved` with the GPU and the models stood in for: every model is built and warmed up once, then
    runs `steps` steps per round in turns (the order reversed every other round); a machine that slows down 10% a
    round changes each model's tokens/s but not their ratio within a round, which the rows give (model b's step
    taking 1.25x model a's: 0.8), with the median round's tokens/s."""
    clock, calls, built = [0.0], [], []
    step_s = {"a": 0.1, "b": 0.125}
    warmup_steps, steps_per_round = 2 * 2, 2 * 2  # 2 models x 2 steps

    def training_step(name, batch, seq, compile_model=False):
        built.append(name)

        def step():
            round_index = max(0, len(calls) - warmup_steps) // steps_per_round
            calls.append(name)
            clock[0] += step_s[name] * 1.1**round_index  # the machine slows down round by round
            return bg.torch.tensor(1.0)

        return bg.types.SimpleNamespace(step=step, n_params=10, fpt=6.0)

    monkeypatch.setattr(bg, "training_step", training_step)
    monkeypatch.setattr(bg.time, "perf_counter", lambda: clock[0])
    for fn in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(bg.torch.cuda, fn, lambda: None)
    monkeypatch.setattr(bg.torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(bg.torch.cuda, "max_memory_allocated", lambda: 2**30)
    rows = list(bg.bench_interleaved(["a", "b"], 2, 8, steps=2, warmup=2, rounds=4, peak=1e3))
    assert built == ["a", "b"]
    assert calls[:warmup_steps] == ["a", "a", "b", "b"]
    assert calls[warmup_steps:] == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b", "b", "b", "a", "a"]
    a, b, ratio = rows
    assert (a["model"], b["model"], a["interleaved_rounds"], a["peak_mem_gib"]) == ("a", "b", 4, 1.0)
    # 2 steps of 2 x 8 tokens a round, 0.2 s of model a's at the first round's speed
    assert a["round_tokens_per_s"] == pytest.approx([32 / (0.2 * 1.1**r) for r in range(4)])
    assert ratio["ratio_to"] == "a" and ratio["round_ratios"] == pytest.approx([0.8] * 4)
    assert ratio["median_ratio"] == pytest.approx(0.8)
    assert a["tokens_per_s"] == pytest.approx((32 / 0.22 + 32 / 0.242) / 2)  # the median of 4: the middle two's mean
    assert a["step_s"] == pytest.approx(16 / a["tokens_per_s"])


def test_trace_gaps_names_the_idle_time_and_the_host_code_that_ended_it(tmp_path):
    """`trace_gaps.analyse` on a hand-made Kineto trace of two steps whose host spans (0-100, 100-200 us) run ahead
    of the GPU. Step 1 launches kernels at 20-30 us (from aten::embedding), a copy on the device at 38-39 (no
    wait), 40-50 and 45-70 (one CUDA graph from CompiledFunction, overlapping) and a copy to the host at 71-72
    (a wait, with a synchronize, inside aten::item); step 2 launches one kernel (from aten::embedding) that runs at
    150-160. Step 1's window on the GPU is 20-150 us: busy 10 + 1 + 30 + 1, idle 88 (8 before the device copy,
    78 before step 2's kernel; gaps under 2 us left out); step 2's is 150-160, all busy. The two copies are the
    host's own (not a CUDA graph's), named by the host ops around their launches."""
    import gzip
    import json

    import trace_gaps

    def x(cat, name, ts, dur, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}

    events = [
        x("user_annotation", "bench_step", 0, 100),
        x("cpu_op", "aten::embedding", 5, 6),
        x("cuda_runtime", "cudaLaunchKernel", 8, 2, correlation=1),
        x("kernel", "embedding_kernel", 20, 10, tid=7, correlation=1),
        x("cpu_op", "CompiledFunction", 30, 30),
        x("cpu_op", "aten::empty", 31, 1),
        x("cuda_runtime", "cudaGraphLaunch", 35, 3, correlation=2),
        x("kernel", "triton_a", 40, 10, tid=7, correlation=2),
        x("kernel", "triton_b", 45, 25, tid=8, correlation=2),
        x("cuda_runtime", "cudaMemcpyAsync", 36, 1, correlation=5),
        x("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 38, 1, tid=7, correlation=5),
        x("cpu_op", "aten::item", 62, 15),
        x("cuda_runtime", "cudaMemcpyAsync", 63, 1, correlation=6),
        x("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 71, 1, tid=9, correlation=6),
        x("cuda_runtime", "cudaStreamSynchronize", 65, 9, correlation=3),
        x("gpu_memset", "Memset (Device)", 44, 0.5, tid=7, correlation=2),  # the graph's own: not the host's
        x("cpu_op", "aten::_foreach_copy_", 33, 2),  # a copy kernel inside the graph's busy time (no gap moves)
        x("cuda_runtime", "cudaLaunchKernel", 33.5, 1, correlation=7),
        x("kernel", "multi_tensor_apply_kernel", 46, 3, tid=9, correlation=7),
        x("cpu_op", "aten::zeros", 56, 2),  # a fill kernel: aten::zeros > aten::zero_ > aten::fill_
        x("cpu_op", "aten::zero_", 56.2, 1.6),
        x("cpu_op", "aten::fill_", 56.4, 1.2),
        x("cuda_runtime", "cudaLaunchKernel", 56.6, 0.5, correlation=8),
        x("kernel", "FillFunctor", 57, 2, tid=9, correlation=8),
        x("user_annotation", "bench_step", 100, 100),
        x("cpu_op", "aten::embedding", 104, 6),
        x("cuda_runtime", "cudaLaunchKernel", 105, 2, correlation=4),
        x("kernel", "embedding_kernel", 150, 10, tid=7, correlation=4),
        x("kernel", "not_launched_in_a_step", 300, 10, tid=7, correlation=99),
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    result = trace_gaps.analyse(trace_gaps.load_trace(path), marker="bench_step")
    assert result["steps"] == [
        {"span_us": 130, "busy_us": 42, "idle_us": 88},
        {"span_us": 10, "busy_us": 10, "idle_us": 0},
    ]
    assert result["idle_us_per_step"] == 44.0
    assert result["gaps_by_origin"] == [["aten::embedding", 39.0, 0.5], ["CompiledFunction", 4.0, 0.5]]
    assert result["waits_by_origin"] == [["aten::item", 5.0, 1.0]]
    # the host's copies (not a graph's): the copy kernel under aten::_foreach_copy_, the device copy from
    # CompiledFunction, the copy to the host from aten::item; not the kernels of aten::embedding nor the graph's fill
    assert result["host_copies_by_origin"] == [
        ["CompiledFunction > aten::_foreach_copy_", 1.5, 0.5],
        ["CompiledFunction > aten::zeros > aten::zero_", 1.0, 0.5],
        ["CompiledFunction", 0.5, 0.5],
        ["aten::item", 0.5, 0.5],
    ]
    assert result["largest_gaps"][0] == {
        "gap_us": 78,
        "origin": "aten::embedding",
        "launch": "cudaLaunchKernel",
        "next": "embedding_kernel",
    }
    assert "idle 0.04 ms" in trace_gaps.report(result)
    # no annotation: the whole trace as one step
    whole = trace_gaps.analyse(trace_gaps.load_trace(path), marker=None)
    assert whole["steps"] == [{"span_us": 290, "busy_us": 62, "idle_us": 228}]
    with pytest.raises(ValueError, match="no GPU events"):
        trace_gaps.analyse([e for e in events if e["cat"] not in trace_gaps.GPU_CATEGORIES])
    with pytest.raises(ValueError, match="no GPU work in the trace was launched inside a 'bench_step' annotation"):
        trace_gaps.analyse([x("user_annotation", "bench_step", 0, 1), *events[2:4]])
    # overlapping streams across a step boundary: step 1's kernel (0-100 us) still runs when step 2's first kernel
    # (50-60, another stream) starts; busy time is the union of both steps' work: 110 of 210 us
    overlap = [
        x("user_annotation", "bench_step", -20, 10),
        x("cuda_runtime", "cudaLaunchKernel", -15, 1, correlation=1),
        x("kernel", "a", 0, 100, tid=7, correlation=1),
        x("user_annotation", "bench_step", -10, 10),
        x("cuda_runtime", "cudaLaunchKernel", -5, 1, correlation=2),
        x("kernel", "b", 50, 10, tid=8, correlation=2),
        x("cuda_runtime", "cudaLaunchKernel", -4, 1, correlation=3),
        x("kernel", "c", 200, 10, tid=7, correlation=3),
        x("user_annotation", "bench_step", 0, 10),  # a step that launched nothing, holding a host wait
        x("cuda_runtime", "cudaStreamSynchronize", 2, 90),
    ]
    result = trace_gaps.analyse(overlap)
    assert [s["busy_us"] for s in result["steps"]] == [50, 60, 0]
    assert sum(s["idle_us"] for s in result["steps"]) == 100 and result["steps"][2]["span_us"] == 0
    assert result["largest_gaps"][0]["gap_us"] == 100 and result["largest_gaps"][0]["next"] == "c"
    assert result["waits_by_origin"] == [["(no host op)", 30.0, 0.33]]  # 90 us over 3 steps
    # without steps the waits of the whole trace count
    assert trace_gaps.analyse(overlap, marker=None)["waits_by_origin"] == [["bench_step", 90.0, 1.0]]
    # steps that begin on the GPU out of order (step 2's first copy on an idle stream before step 1's kernel):
    # windows follow the GPU's order, none negative, and together they span all the work
    early = [
        x("user_annotation", "bench_step", -20, 10),
        x("cuda_runtime", "cudaLaunchKernel", -15, 1, correlation=1),
        x("kernel", "a", 100, 50, tid=7, correlation=1),
        x("user_annotation", "bench_step", -10, 10),
        x("cuda_runtime", "cudaMemcpyAsync", -5, 1, correlation=2),
        x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 30, 5, tid=9, correlation=2),
        x("cuda_runtime", "cudaLaunchKernel", -4, 1, correlation=3),
        x("kernel", "b", 150, 20, tid=7, correlation=3),
    ]
    result = trace_gaps.analyse(early)
    assert all(s["span_us"] >= 0 and s["idle_us"] >= 0 for s in result["steps"])
    assert sum(s["span_us"] for s in result["steps"]) == 140 and sum(s["busy_us"] for s in result["steps"]) == 75
    # a malformed event is named, not a KeyError
    (tmp_path / "no_dur.json").write_text(json.dumps({"traceEvents": [{"ph": "X", "name": "k", "ts": 1}]}))
    with pytest.raises(ValueError, match=r"no_dur.json: traceEvents\[0\] is a complete event without"):
        trace_gaps.load_trace(tmp_path / "no_dur.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not a readable Chrome trace"):
        trace_gaps.load_trace(tmp_path / "bad.json")
