"""`modelcode bench` and what it stands on: random-weight models, transformers' twin on the same tensors,
the JSON, table and plot. Smoke-sized: no assertion here is about speed."""

import json
import statistics

import pytest
import torch
from PIL import Image

from modelcode.bench.measure import gpu_ms_per_step
from modelcode.bench.report import table
from modelcode.bench.run import Settings, bench
from modelcode.bench.subjects import hf_twin, random_weights, weight_bytes
from modelcode.cli.__main__ import main as cli
from modelcode.errors import CheckpointError
from modelcode.layers import RopeScaling
from modelcode.loading.save import to_checkpoint_names
from modelcode.loading.weight_maps import llama as llama_maps
from modelcode.models.llama import Llama, LlamaConfig

TINY = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, max_seq_len=64)
VARIANTS = {
    "llama3-gqa-tied": dict(rope_theta=500000.0, tie_word_embeddings=True),
    "llama3.1-rope-scaling": dict(rope_scaling=RopeScaling("llama3", 8.0, 16, 1.0, 4.0)),
    "mistral-sliding-window": dict(sliding_window=4),
    "qwen2-qkv-bias": dict(qkv_bias=True),
    "mha-mlp-bias": dict(n_kv_heads=4, mlp_bias=True, qkv_bias=True, o_bias=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_twin_shares_the_weights_and_equals_our_logits(variant):
    with torch.device("meta"):
        model = Llama(LlamaConfig(**{**TINY, **VARIANTS[variant]}))
    random_weights(model, torch.float32, torch.device("cpu"), seed=1)
    hf = hf_twin(model)
    assert hf.model.layers[1].mlp.down_proj.weight.data_ptr() == model.layers[1].feed_forward.w2.weight.data_ptr()
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_random_weights_are_random_tied_and_in_the_dtype():
    with torch.device("meta"):
        model = Llama(LlamaConfig(**TINY, tie_word_embeddings=True))
    random_weights(model, torch.bfloat16, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert model.output.weight is model.tok_embeddings.weight
    norms = [model.layers[0].attention_norm.weight, model.layers[0].ffn_norm.weight]
    assert not torch.equal(*norms)  # a swap of the two would show in the parity test
    assert model.rotary.inv_freq.device.type == "cpu"
    # tied: the output head reads the embedding table every step, so it counts once
    matrices = sum(p.numel() * 2 for p in model.parameters())
    assert weight_bytes(model) == matrices + model.rotary.inv_freq.numel() * 4


def test_weight_bytes_leave_out_an_untied_embedding():
    with torch.device("meta"):
        model = Llama(LlamaConfig(**TINY))
    random_weights(model, torch.float32, torch.device("cpu"))
    total = sum(p.numel() * 4 for p in model.parameters()) + model.rotary.inv_freq.numel() * 4
    assert weight_bytes(model) == total - model.tok_embeddings.weight.numel() * 4


def test_unknown_name_in_the_inverse_weight_map_is_named():
    with pytest.raises(CheckpointError, match="no checkpoint name for 'layers.0.attention.rope.freqs'"):
        to_checkpoint_names({"layers.0.attention.rope.freqs": torch.zeros(1)}, llama_maps.HF)


def test_bench_cli_writes_sane_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "results" / "tiny.json"
    cli(["bench", "--batch-sizes", "1", "2", "--prompt-len", "8", "--new-tokens", "6", "--repeats", "2",
         "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["model"]["name"] == "tinystories-656k" and result["model"]["parameters"] == 656_000
    assert result["model"]["weight_bytes_per_step"] > 2_600_000  # float32 weights, the tied embedding once
    assert result["roofline_gbps"] > 0 and result["machine"]["torch_threads"] >= 1
    if result["machine"]["cpu_kernels"]:  # how each kernel asks for its weights ahead, as the library loaded it
        assert set(result["machine"]["cpu_kernel_prefetch"]) == {"bf16", "int8", "int4"}
        assert all(result["machine"]["cpu_kernel_prefetch"].values())
    assert [r["batch"] for r in result["results"]] == [1, 2]
    for r in result["results"]:
        for impl in ("ours", "transformers"):
            x = r[impl]
            assert x["decode_tok_s"] > 0 and x["prefill_tok_s"] > 0 and x["ttft_ms"] > 0
            # each run against the bandwidth read just before it, 2 repeats interleaved with the other runs
            assert len(x["runs"]) == 2 and x["gbps"] > 0
            assert x["roofline_pct"] == pytest.approx(statistics.median(100 * run["gbps"] / run["roofline_gbps"]
                                                                        for run in x["runs"]))
            lo, hi = result["roofline_range_gbps"]
            assert all(lo <= run["roofline_gbps"] <= hi for run in x["runs"])
        assert r["ours"]["peak_memory_gb"] > 0
        assert r["decode_speedup"] == pytest.approx(r["ours"]["decode_tok_s"] / r["transformers"]["decode_tok_s"])
        assert r["same_tokens"]  # float32 greedy: transformers and we pick the same tokens
    table = capsys.readouterr().out
    assert "decode tok/s" in table and table.count("transformers") >= 2
    with Image.open(out.with_suffix(".png")) as png:
        assert png.format == "PNG" and png.size[0] > 400


def test_gpu_time_per_step_is_two_runs_difference_over_the_steps_between():
    def gpu_seconds_of_run(n):  # 5 ms of prefill and first token, then 2 ms per decode step
        return 0.005 + 0.002 * (n - 1)

    assert gpu_ms_per_step(gpu_seconds_of_run, 32) == pytest.approx(2.0)
    assert gpu_ms_per_step(gpu_seconds_of_run, 3) == pytest.approx(2.0)


def test_the_table_shows_gpu_time_beside_the_wall_time_where_measured():
    result = bench(Settings(batch_sizes=(1, 2), prompt_len=4, new_tokens=3, repeats=1, warmup=1, hf=False),
                   log=lambda _: None)
    assert "GPU ms" not in table(result) and "gpu_ms_per_step" not in result["results"][0]["ours"]  # on CPU
    for r, gpu_ms in zip(result["results"], (1.25, 2.5)):
        r["ours"]["gpu_ms_per_step"] = gpu_ms
    lines = table(result).splitlines()
    assert lines[1].split()[-4:] == ["step", "ms", "GPU", "ms"]
    step_ms = 1e3 / result["results"][0]["ours"]["decode_tok_s"]
    assert lines[3].split()[-2:] == [f"{step_ms:.2f}", "1.25"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_a_gpu_measures_its_time_per_step():
    result = bench(Settings(batch_sizes=(1,), prompt_len=8, new_tokens=16, repeats=1, hf=False, compile=True,
                            device="cuda"), log=lambda _: None)
    ours = result["results"][0]["ours"]
    assert 0 < ours["gpu_ms_per_step"] <= 1.05e3 / ours["decode_tok_s"]  # the GPU busy at most the step's time


def test_bench_compiled_and_quantized_runs_without_transformers():
    pytest.importorskip("modelcode.quantization")
    result = bench(Settings(batch_sizes=(1,), prompt_len=4, new_tokens=3, repeats=1, warmup=1, hf=False,
                            quantize="int8", compile=True, autotune=False), log=lambda _: None)
    ours = result["results"][0]["ours"]
    assert "transformers" not in result["results"][0] and ours["decode_tok_s"] > 0
    assert result["model"]["quantize"] == "int8"
    assert result["model"]["weight_bytes_per_step"] < 0.6 * 656_000 * 4  # int8 layers, float32 tied embedding
    assert result["model"]["quantize_head"] is None  # tied to the embeddings: it stays


@pytest.mark.parametrize("quantize_head,recorded", [(None, "int8"), (True, "int4"), (False, None)])
def test_bench_records_how_the_output_head_was_quantized(tmp_path, quantize_head, recorded):
    from hf_reference import tiny_hf_model

    tiny_hf_model("untied-embeddings").save_pretrained(tmp_path)
    result = bench(Settings(model=str(tmp_path), batch_sizes=(1,), prompt_len=4, new_tokens=2, repeats=1, warmup=1,
                            hf=False, quantize="int4", quantize_head=quantize_head), log=lambda _: None)
    assert result["model"]["quantize_head"] == recorded
    assert f"int4 (head {recorded or 'unquantized'})" in table(result)


def test_bench_times_speculative_decoding_beside_plain_decoding():
    from modelcode.bench.report import table

    quick = dict(batch_sizes=(1,), prompt_len=8, new_tokens=12, repeats=1, warmup=0, hf=False)
    # the embedded model drafting for itself: greedy, so every draft is accepted and the tokens are plain greedy's
    result = bench(Settings(**quick, draft="tinystories-656k", speculate_k=3), log=lambda _: None)
    spec = result["speculative"]
    assert spec["method"] == "draft model" and spec["same_tokens"] and spec["acceptance_rate"] == 1.0
    assert spec["tokens_per_target_pass"] == 3  # 12 tokens: the prefill's, then 11 in passes of k + 1 = 4 at most
    assert spec["speculative_tok_s"] > 0 and spec["speedup"] == spec["speculative_tok_s"] / spec["plain_tok_s"]
    assert "speculative decoding (batch 1, eager, greedy), draft model, k=3" in table(result)
    lookup = bench(Settings(**quick, prompt_lookup=2), log=lambda _: None)["speculative"]
    assert lookup["method"] == "prompt lookup n=2" and lookup["same_tokens"] and 0 <= lookup["acceptance_rate"] <= 1


def test_bench_bad_settings_say_what_to_do():
    with pytest.raises(ValueError, match="no model 'no-such-model'.*llama-1b"):
        bench(Settings(model="no-such-model", hf=False), log=lambda _: None)
    with pytest.raises(ValueError, match="exceed the model's context of 512"):
        bench(Settings(prompt_len=500, new_tokens=20, hf=False), log=lambda _: None)
    with pytest.raises(ValueError, match="--new-tokens >= 2"):
        bench(Settings(new_tokens=1, hf=False), log=lambda _: None)
    with pytest.raises(ValueError, match="one speculative drafter"):
        bench(Settings(draft="tinystories-656k", prompt_lookup=3, hf=False), log=lambda _: None)


def test_transformers_twin_needs_a_folder_for_other_architectures():
    with pytest.raises(ValueError, match="no transformers twin for a Linear without a Hugging Face folder"):
        hf_twin(torch.nn.Linear(2, 2), None)
