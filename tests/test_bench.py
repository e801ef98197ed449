"""`osp-compile bench` pieces that run without a GPU: the GPU-state summary read from nvidia-smi's
output, and the printed table (the timings themselves need CUDA: BENCHMARKS.md)."""
import pytest
import torch

from osp_compile import bench


def test_gpu_sampler_summarises_clock_power_and_power_cap():
    sampler = bench.GPUSampler("cuda")
    sampler.proc = object()  # as if nvidia-smi had run
    sampler.output = "\n".join([
        "1980, 320.5, 0x0000000000000000",
        "1590, 696.0, 0x0000000000000004",   # SW power cap
        "1545, 699.1, 0x0000000000000004",
        "[N/A], [N/A], [N/A]",               # skipped
        "1620, 698",                         # cut off by terminate(): skipped
    ])
    assert sampler.summary() == {"sm_mhz_median": 1590.0, "power_w_median": 696.0,
                                 "power_capped_share": 0.67, "samples": 3}
    assert bench.GPUSampler("cpu").__enter__().summary() == {}


def test_table_shows_speedup_gpu_state_and_ablation_costs():
    result = {"preset": "wan-14b", "resolution": "720p", "grid": [21, 45, 80], "tokens": 75600, "layers": 40,
              "layer_reduced": False, "full_blocks": 8, "sparse_ratio": 2, "dtype": "torch.bfloat16",
              "device": "H100", "torch": "2.11", "iters": 2,
              "ablation_costs": [{"work": "rearranging and switching", "of": "osp-backend", "ablation": "osp-no-relayout",
                                  "ms": 2.2, "share_of_step": 0.001}],
              "rows": [{"variant": "dense-inductor", "median_ms": 100.0, "min_ms": 99.0, "speedup_vs_inductor": 1.0,
                        "compile_s": 1.0, "peak_gib": 1.0, "note": "", "breakdown": {},
                        "gpu_state": {"sm_mhz_median": 1590.0, "power_w_median": 696.4, "power_capped_share": 1.0}},
                       {"variant": "osp-backend", "median_ms": 55.0, "min_ms": 54.0, "speedup_vs_inductor": 1.818,
                        "compile_s": 1.0, "peak_gib": 1.0, "note": "", "gpu_state": {},
                        "breakdown": {"attention": {"ms": 30.0, "share": 0.6}, "top_kernels": [],
                                      "attention_calls_ms": [{"ms": 27.5, "name": "cudnn"}]}}]}
    text = bench.table(result)
    assert "1590 / 696 / 100%" in text and "1.818" in text
    assert "cost of rearranging and switching (osp-backend - osp-no-relayout): 2.2 ms = 0.1% of the osp-backend step" in text
    assert "padding: none" in text
    assert "profile osp-backend: attention 30.0 ms (60.0%)" in text and "attention_calls" not in text


def test_inductor_fused_kernels_are_never_attention_or_gemm():
    """Inductor names a kernel after the ops it fuses: a norm beside attention, or GELU after a
    GEMM, mentions them without being them."""
    assert bench.categorize("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert bench.categorize("nvjet_sm90_tst_192x208_64x4_1x2_h_bz_coopB_bias_TNT") == "gemm"
    norm = "triton_red_fused__scaled_dot_product_cudnn_attention__to_copy_add_mean_mul_pow_rsqrt_transpose_view_8"
    assert bench.categorize(norm) == "other (norms, modulation, pointwise)"
    assert bench.categorize("triton_poi_fused_addmm_gelu_view_12") == "other (norms, modulation, pointwise)"
    assert bench.categorize("triton_red_fused__to_copy_add_index_select_mul_native_layer_norm_17").startswith("relayout")


def test_timeline_counts_overlaps_once_and_names_the_gaps():
    from osp_compile.bench import timeline

    kernels = [(0.0, 100.0, "gemm"), (50.0, 120.0, "side"), (400.0, 500.0, "attention"), (510.0, 600.0, "norm")]
    t = timeline(kernels)
    assert t["span_ms"] == 0.6 and t["busy_ms"] == 0.31 and t["idle_ms"] == 0.29 and t["gaps"] == 2
    assert t["largest_gaps"][0] == {"us": 280.0, "after": "side", "before": "attention"}
    assert timeline([]) == {}


def test_prequantized_activations_replay_the_first_step_in_call_order():
    """The ``osp-hif8-no-actquant`` ablation: the first step quantizes as usual; later steps get
    its E4M3 activations back call by call without reading x (a NaN x changes nothing); a step
    that calls the linears in another order is refused; outside the context x is quantized again."""
    import torch

    from osp_compile.hif8 import fp8, inference

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen)
    weight = fp8.transcode_weight(*inference.quantize_weight(w))
    x, wide = torch.randn(2, 8, 64, generator=gen), torch.randn(3, 64, generator=gen)
    step = lambda a, b: (fp8.fp8_linear(a, weight, reuse_activation=False), fp8.fp8_linear(b, weight))
    real = step(x, wide)
    with bench.activations_prequantized() as first_step_done:
        with pytest.raises(RuntimeError, match="no FP8 linear"):
            first_step_done()
        first = step(x, wide)
        first_step_done()
        for _ in range(2):
            replayed = step(torch.full_like(x, float("nan")), torch.randn(3, 64, generator=gen))
            assert all(torch.equal(r, f) for r, f in zip(replayed, first))
        with pytest.raises(RuntimeError, match="another order"):
            step(wide, x)
    assert all(torch.equal(r, f) for r, f in zip(real, first))
    exact = x @ w.T
    assert (step(x, wide)[0] - exact).norm() < 0.1 * exact.norm()
    assert not step(torch.full_like(x, float("nan")), wide)[0].isfinite().all()  # quantizes again


def test_interleaved_rounds_alternate_the_order_and_keep_each_rounds_median():
    """Round 1 runs A then B, round 2 B then A, ...; every variant's samples of all rounds make its
    median, and each round's own median is kept for the per-round ratios."""
    order = []

    def step_of(name, ms):
        def step():
            order.append(name)
            return ms.pop(0)
        return step

    rows = {v: bench.Row(v) for v in ("dense-inductor", "osp-backend")}
    live = {"dense-inductor": (rows["dense-inductor"], step_of("A", [10.0, 12.0, 30.0, 31.0, 11.0, 13.0])),
            "osp-backend": (rows["osp-backend"], step_of("B", [5.0, 6.0, 20.0, 21.0, 4.0, 4.0]))}
    bench._interleaved_rounds(live, lambda step: step(), iters=2, rounds=3, device="cpu", profile=False, progress=False)
    assert "".join(order) == "AABBBBAAAABB"
    assert rows["dense-inductor"].round_medians_ms == [11.0, 30.5, 12.0]
    assert rows["osp-backend"].round_medians_ms == [5.5, 20.5, 4.0]
    assert rows["dense-inductor"].median_ms == 12.5 and rows["osp-backend"].min_ms == 4.0


def test_rounds_run_compiled_variants_side_by_side_and_refuse_ablations():
    result = bench.run("tiny", "480p", layers=2, num_full_blocks=0, variants=["dense-eager", "osp-convert"], warmup=0,
                       iters=1, device="cpu", profile=False, progress=False, rounds=2, frames=1)
    assert tuple(result["grid"]) == (1, 30, 52)
    assert result["rounds"] == 2
    assert [len(r["round_medians_ms"]) for r in result["rows"]] == [2, 2]
    assert all(r["median_ms"] and not r["note"] for r in result["rows"])
    # the outputs compared with the reference's (dense eager here): every site sparse changes the output
    # (a little: the tiny model's random attention is nearly uniform)
    assert result["reference"] == "dense-eager" and [r["rel_err"] for r in result["rows"]][0] == 0.0
    assert 0 < result["rows"][1]["rel_err"] < 2, result["rows"][1]
    assert "rel err vs dense-eager" in bench.table(result)
    with pytest.raises(ValueError, match="reference='osp-backend': name one of the variants run"):
        bench.run("tiny", variants=["dense-eager"], device="cpu", reference="osp-backend")
    with pytest.raises(ValueError, match="cannot be interleaved"):
        bench.run("tiny", variants=["dense-eager", "osp-no-relayout"], device="cpu", rounds=2)
    with pytest.raises(ValueError, match="at least 1"):
        bench.run("tiny", device="cpu", rounds=0)


@pytest.mark.parametrize("preset, resolution, layers, grid, sites, wrong", [
    ("cogvideox-5b", "480p", 1, (1, 30, 45), [("joint", "token")], "720p"),
    ("hunyuanvideo", "544p", 2, (1, 34, 60), [("joint", "token"), ("joint", "group")], "480p"),
])
def test_third_party_shapes_run_through_the_bench_with_their_joint_attention_sparse(preset, resolution, layers, grid,
                                                                                  sites, wrong):
    """The third-party workloads at their real widths: diffusers' CogVideoX at CogVideoX-5B's (48
    heads of 64, 226 text tokens, text first) and HunyuanVideo (24 heads of 128, 256 text tokens
    half of them masked, video first; one double- and one single-stream block), one latent frame
    on CPU. Every block sparse: its joint attention became `osp::skiparse_joint_attention`
    (convert's report) and the step ran. Bad resolutions and frame counts get clear errors."""
    pytest.importorskip("diffusers")
    result = bench.run(preset, resolution, layers=layers, num_full_blocks=0, variants=["dense-eager", "osp-convert"],
                       warmup=0, iters=1, device="cpu", profile=False, progress=False, frames=1)
    assert tuple(result["grid"]) == grid and result["layers"] == layers and result["layer_reduced"]
    assert all(r["median_ms"] and not r["note"] for r in result["rows"]), result["rows"]
    work = bench.THIRD_PARTY[preset](resolution, layers, 1, "cpu", torch.float32)
    assert {p.dtype for p in work.model.parameters()} == {torch.float32}
    from osp_compile import OSPConfig, convert

    report = convert(work.model, work.args, work.kwargs, OSPConfig(num_full_blocks=0)).osp_report
    assert [(s.kind, s.layout) for s in report.video_sites] == sites
    with pytest.raises(ValueError, match=f"{preset} runs at .*got '{wrong}'"):
        bench.THIRD_PARTY[preset](wrong, 1, 1, "cpu", torch.float32)
    with pytest.raises(ValueError, match="4n \\+ 1 frames"):
        bench.THIRD_PARTY[preset](resolution, 1, 2, "cpu", torch.float32)


def test_an_unknown_preset_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'cogvideox': use one of tiny, .*cogvideox-5b, hunyuanvideo"):
        bench.run("cogvideox", device="cpu")


def test_table_of_interleaved_rounds_gives_each_rounds_ratio():
    result = {"preset": "wan-14b", "resolution": "720p", "grid": [21, 45, 80], "tokens": 75600, "layers": 40,
              "layer_reduced": False, "full_blocks": 8, "sparse_ratio": 2, "dtype": "torch.bfloat16",
              "device": "H100", "torch": "2.11", "iters": 2, "rounds": 3, "ablation_costs": [],
              "rows": [{"variant": "osp-hif8-fast", "median_ms": 50.0, "min_ms": 49.0, "speedup_vs_inductor": 2.2,
                        "round_speedups": [2.21, 2.19, 2.205], "compile_s": 1.0, "peak_gib": 1.0, "note": "",
                        "breakdown": {}, "gpu_state": {}}]}
    text = bench.table(result)
    assert "3 interleaved rounds x 2" in text and "2.205 (2.190-2.210)" in text
    result["fp8_gemms"] = [
        {"m": 75600, "n": 5120, "k": 13824, "bias": True, "fast_accum": True, "candidates": 3, "chosen": 2,
         "candidates_ms": [7.84, 7.52, 7.34]},
        {"m": 300, "n": 64, "k": 128, "refused": "cuBLASLt has no FP8 kernel"}]
    text = bench.table(result)
    assert "FP8 GEMM 75600x13824 @ 13824x5120: cuBLASLt candidate 2 of 3 (timed ms: 7.840, 7.520, 7.340)" in text
    assert "FP8 GEMM 300x128 @ 128x64: torch._scaled_mm, cuBLASLt refused it (cuBLASLt has no FP8 kernel)" in text
