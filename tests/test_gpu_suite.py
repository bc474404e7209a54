"""benchmarks/gpu_suite.py in its smoke size on CPU: every part (decode at batch 1 and 32 with compiled variants, MTP
speculation, FP8 GEMM, continuous batching with and without the FP8 latent) runs and writes its RESULTS.md section, so the GPU run finds a working script."""

from __future__ import annotations

import re

from benchmarks import gpu_suite
from modeling_deepseek.compat import MLA_PAGED_CACHE
from conftest import tiny_model


def test_gpu_suite_smoke_writes_every_section(tmp_path):
    from trainers.corpus import stdlib_source_files, train_tokenizer

    tokenizer = train_tokenizer(stdlib_source_files(limit=4), vocab_size=300)
    model_dir = tmp_path / "mtp_model"
    tiny_model(seed=0, vocab_size=len(tokenizer), num_hidden_layers=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    done = gpu_suite.main(["--smoke", "--device", "cpu", "--dtype", "fp32", "--out-dir", str(out),
                           "--mtp-model-dir", str(model_dir)])
    text = (out / "RESULTS.md").read_text()
    sections = dict(re.findall(r"<!-- BEGIN (\S+) -->\n(.*?)<!-- END \1 -->", text, re.S))
    cb_sections = {"continuous-batching", "continuous-batching-fp8"} if MLA_PAGED_CACHE else {
        "gpu-suite-continuous-batching-cpu"}  # transformers < 5.25: the section says why nothing was measured
    assert set(sections) == {"decode-compile-gpu-suite-b1-cpu-fp32", "decode-compile-gpu-suite-b32-cpu-fp32",
                             "gpu-suite-mtp-cpu", "gpu-suite-fp8-gemm-cpu", "gpu-suite-fp8-train-step-cpu",
                             *cb_sections}
    for batch in ("1", "32"):
        report = done["decode"][batch]
        assert report["settings"]["batch"] == int(batch)
        run = report["runs"][0]
        assert set(run["variants"]) == {"peer_eager", "peer_compiled", "ours_eager", "ours_compiled"}
        assert all(r["tokens_equal_ours_eager"] for r in run["variants"].values())
        assert run["recompiled_during_timing"] == 0
        assert "equal ours_eager's: **yes**" in sections[f"decode-compile-gpu-suite-b{batch}-cpu-fp32"]
    mtp = done["mtp"]["rows"][0]
    assert mtp["identical"] and mtp["drafted"] > 0  # speculation gave greedy's tokens
    assert "| batch 1, k=1 |" in sections["gpu-suite-mtp-cpu"]
    gemm = done["fp8-gemm"]["rows"][0]
    assert gemm["bf16_ms"] > 0 and gemm["fp8_ms"] > 0 and done["fp8-gemm"]["backend"] == "reference"
    step = done["fp8-train-step"]["rows"]
    assert all(step[m]["step_ms"] > 0 and step[m]["peak_bytes"] > 0 for m in ("bf16", "fp8"))
    assert step["bf16"]["parameters"] == step["fp8"]["parameters"]  # the same model, converted in place
    if not MLA_PAGED_CACHE:
        assert "Not measured" in sections["gpu-suite-continuous-batching-cpu"] and done["continuous-batching"] is None
        return
    peer_vs_ours, fp8 = (done["continuous-batching"][name]["generate_batch"] for name in ("peer_ours", "ours_ours_fp8"))
    assert peer_vs_ours["same_tokens"] and all(peer_vs_ours[v]["tok_s"] > 0 for v in ("peer", "ours"))
    assert fp8["ours_fp8"]["allocator"] == ["FP8LatentAllocator"] and fp8["ours"]["allocator"] == ["MLACacheAllocator"]
    assert fp8["ours_fp8"]["cache_bytes_per_token"] < fp8["ours"]["cache_bytes_per_token"] / 3  # fp32 run: ~1/4
