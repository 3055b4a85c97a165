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
        ("llamathink:fla:chunk128", r"unknown variant 'chunk128' of llamathink \(.*csa-chunk<N>\)"),
        ("hf-llama:csa-chunk128", "unknown variant 'csa-chunk128' of hf-llama"),
    ],
)
def test_wrong_model_names_stop_with_the_fault_named(name, message):
    with pytest.raises(SystemExit, match=message):
        bg.check_model_name(name)


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
