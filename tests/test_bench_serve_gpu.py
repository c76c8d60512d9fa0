"""bench/serve_gpu.py in-process on the tiny config (what it runs without CUDA): every section measures ours and the
reference with the same weights, the report has the shape of a GPU run's with positive numbers, and the time budget
and --sections decide what runs (and whether the reference is built at all)."""
import json

import pytest

from bench import serve_gpu

SMALL = ["--tiny", "--visual-tokens", "256", "--tower-tubes", "1", "--stream-tubes", "1", "--new-tokens", "3",
         "--prompt-tokens", "16", "--reps", "1", "--gemm-n", "256", "--decode-levels", "1", "4"]


@pytest.fixture(scope="module")
def report():
    return serve_gpu.main(SMALL)


def test_report_names_the_machine_and_says_gpu_numbers_are_pending(report):
    json.dumps(report)                                                  # what the script prints
    assert report["bench"] == "serve_gpu" and report["tiny"] and report["dtype"] == "float32"
    assert {"device", "torch", "transformers"} <= set(report["machine"])
    assert "still to be measured" in report["note"]
    assert list(report["sizes"]) == ["tiny"] and report["sizes"]["tiny"]["skipped"] == []


def test_prefill_runs_both_sides_on_the_same_weights(report):
    prefill = report["sizes"]["tiny"]["prefill"]
    assert prefill["ours"]["visual_tokens"] == 256
    for side in ("ours", "reference"):
        assert prefill[side]["seconds_median"] > 0
    assert prefill["speedup_vs_reference"] > 0
    assert prefill["reference"]["max_abs_logit_diff_vs_ours"] <= 1e-3 < prefill["reference"]["max_abs_logit"]


def test_tower_measures_patches_per_second_against_the_gemm_peak(report):
    tower = report["sizes"]["tiny"]["tower"]
    assert tower["gemm_peak_gflops"] > 0 and tower["flops_per_patch_mflop"]["total"] > 0
    for side in ("ours", "reference"):
        assert tower[side]["patches_per_s"] > 0 and tower[side]["fraction_of_gemm_peak"] > 0
    assert tower["segments"]["720p"] == [1, 40, 72]
    assert tower["goal"]["name"] == "tower_fraction_of_gemm_peak" and tower["goal"]["at_least"] == 0.45
    assert report["goals_met"] == {"tiny": {"tower_fraction_of_gemm_peak": tower["goal"]["met"]}}
    assert isinstance(tower["goal"]["met"], bool)


def test_streams_follow_the_resize_rules(report):
    streams = report["sizes"]["tiny"]["streams"]
    assert streams["448x448"]["patches_per_stream_second"] == 32 * 32          # one 448x448 tube per second
    assert streams["720p"]["frame_size"] == [560, 1008]                        # 720p over max_pixels, resized
    assert streams["720p"]["patches_per_stream_second"] == 40 * 72
    for one in streams.values():
        assert one["patches_per_s"] > 0 and one["streams"] > 0


def test_generate_decodes_the_same_tokens_as_the_reference(report):
    generate = report["sizes"]["tiny"]["generate"]
    for side in ("ours", "reference"):
        assert generate[side]["decode_tokens_per_s"] > 0 and generate[side]["new_tokens"] == 3
    assert generate["first_token_difference"] is None                          # fp32 greedy: equal tokens


def test_sections_without_a_reference_never_build_it():
    result = serve_gpu.main([*SMALL, "--sections", "streams"])["sizes"]["tiny"]
    assert "streams" in result and "prefill" not in result
    assert "reference" not in result["build_s"]


def test_a_spent_budget_skips_sections_and_claims_no_goal(tmp_path):
    result = serve_gpu.main([*SMALL, "--timeout-budget", "0", "--out", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text()) == result
    assert result["goals_met"] == {}
    assert result["sizes"]["tiny"]["skipped"] == [f"{name}: time budget spent" for name in serve_gpu.SECTIONS]


def test_unknown_section_is_refused(capsys):
    with pytest.raises(SystemExit):
        serve_gpu.main(["--tiny", "--sections", "prefill,nope"])
    assert "nope" in capsys.readouterr().err


def test_decode_runs_questions_together_and_one_by_one(report):
    levels = report["sizes"]["tiny"]["decode"]["levels"]
    assert list(levels) == ["1", "4"]
    for n, level in levels.items():
        assert level["concurrency"] == int(n) and level["same_tokens"]
        assert level["new_tokens"] == 3 * int(n)                     # no stop id: every answer runs its full length
        assert level["concurrent_tok_s"] > 0 and level["sequential_tok_s"] > 0
