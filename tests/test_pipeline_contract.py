"""The pipeline contract: AR order rules, finalize rules, encoder/decoder rules, profiler."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import (
    AutoregressiveOrderError,
    EventProfiler,
    FinalizeError,
    InputError,
    load_pipeline,
)
from pipeline.synthetic import expected_frames
from tests.external_pipeline import make_config


@pytest.fixture(scope="module")
def synth():
    return load_pipeline("synthetic", device="cpu")


def start(pipe, seed: int = 0):
    return pipe.io.initialize_session(pipe, pipe.io.validate_options({}), seed)


def step_input(pipe, action=None, k: int = 0):
    return pipe.io.action_to_input(pipe.io.validate_action(action), k)


def test_full_ar_loop_matches_expected_frames(synth):
    cache = start(synth, seed=11)
    for k in range(6):
        action = {"x": k, "y": 2 * k}
        frames = synth.io.output_to_frames(synth.generate(k, cache, step_input(synth, action, k)))
        assert np.array_equal(frames.numpy(), expected_frames(11, k, action))
        synth.finalize(k, cache)


def test_generate_must_start_at_zero(synth):
    cache = start(synth)
    with pytest.raises(AutoregressiveOrderError, match=r"expected generate\(0\).*got generate\(1\)") as e:
        synth.generate(1, cache, step_input(synth))
    assert (e.value.expected, e.value.got) == (0, 1)


def test_generate_must_be_previous_plus_one(synth):
    cache = start(synth)
    synth.generate(0, cache, step_input(synth))
    synth.finalize(0, cache)
    for bad in (0, 2, 5):
        with pytest.raises(AutoregressiveOrderError, match=r"expected generate\(1\) after step 0"):
            synth.generate(bad, cache, step_input(synth))
    # the failed calls changed nothing: the next valid step still gives the right frames
    frames = synth.io.output_to_frames(synth.generate(1, cache, step_input(synth)))
    assert np.array_equal(frames.numpy(), expected_frames(0, 1, None))


def test_finalize_before_generate(synth):
    cache = start(synth)
    with pytest.raises(FinalizeError, match=r"before any generate\(\)"):
        synth.finalize(0, cache)


def test_finalize_consumes_state_once(synth):
    cache = start(synth)
    synth.generate(0, cache, step_input(synth))
    synth.finalize(0, cache)
    with pytest.raises(FinalizeError, match=r"already finalized.*generate\(1"):
        synth.finalize(0, cache)


def test_finalize_index_must_match_latest_generate(synth):
    cache = start(synth)
    synth.generate(0, cache, step_input(synth))
    with pytest.raises(AutoregressiveOrderError, match=r"finalize\(3\).*generate\(0\)"):
        synth.finalize(3, cache)
    synth.finalize(0, cache)  # still pending and consumable after the error


def test_skipped_finalize_changes_frames(synth):
    """The synthetic target depends on finalize having run: a server that skips it is caught."""
    cache = start(synth, seed=3)
    synth.generate(0, cache, step_input(synth))
    frames = synth.io.output_to_frames(synth.generate(1, cache, step_input(synth)))
    assert not np.array_equal(frames.numpy(), expected_frames(3, 1, None))


def test_input_without_encoder_is_an_error():
    pipe = make_config(with_encoder=False).setup()
    cache = pipe.initialize_cache()
    with pytest.raises(InputError, match="no encoder"):
        pipe.generate(0, cache, input=torch.tensor(1.0))
    assert cache.autoregressive_index is None  # the failed call did not advance the rollout
    out = pipe.generate(0, cache)  # no input: fine
    assert out.shape == (1, 4, 4)


def test_no_decoder_returns_clean_latent():
    pipe = make_config().setup()
    cache = pipe.initialize_cache(transformer_context={"seed": 1})
    out = pipe.generate(0, cache, input=torch.tensor(0.5))
    torch.testing.assert_close(out, torch.full((1, 4, 4), 0.5))
    pipe.finalize(0, cache)
    out = pipe.generate(1, cache, input=torch.tensor(0.0))
    torch.testing.assert_close(out, torch.full((1, 4, 4), 1.0))


def test_synthetic_without_decoder_returns_latent():
    pipe = load_pipeline("synthetic", decoder=None, device="cpu")
    cache = start(pipe)
    out = pipe.generate(0, cache, step_input(pipe))
    assert out.shape == (1, 1, 3, 8, 8) and out.dtype == torch.float32


def test_profiler_times_every_stage_on_cpu():
    pipe = load_pipeline(
        "synthetic", generate_ms=20.0, finalize_ms=10.0, enable_sync_and_profile=True, device="cpu"
    )
    cache = start(pipe)
    pipe.generate(0, cache, step_input(pipe))
    stats = pipe.finalize(0, cache)
    assert stats is not None
    assert set(stats) >= {"encode_ms", "diffuse_ms", "decode_ms", "finalize_ms", "total_ms"}
    assert stats["diffuse_ms"] >= 18.0
    assert stats["finalize_ms"] >= 9.0
    assert stats["total_ms_wo_finalize"] == pytest.approx(stats["total_ms"] - stats["finalize_ms"])
    assert "mem_alloc_gib" not in stats  # CPU reports no device memory


def test_profiler_off_returns_none(synth):
    cache = start(synth)
    synth.generate(0, cache, step_input(synth))
    assert synth.finalize(0, cache) is None


def test_event_profiler_cpu_durations():
    prof = EventProfiler("cpu")
    torch.randn(200, 200) @ torch.randn(200, 200)
    prof.record("a")
    prof.record("b")
    out = prof.sync_and_summarize()
    assert list(out) == ["a", "b"] and all(v >= 0 for v in out.values())


def test_rules_hold_under_python_O():
    """The rules are exceptions, not asserts: they survive ``python -O``."""
    code = (
        "from pipeline import load_pipeline, AutoregressiveOrderError\n"
        "p = load_pipeline('synthetic', device='cpu'); io = p.io\n"
        "c = io.initialize_session(p, io.validate_options({}), 0)\n"
        "try:\n    p.generate(3, c, io.action_to_input(None, 3))\n"
        "except AutoregressiveOrderError:\n    print('raised')\n"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "raised"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_synthetic_and_profiler():
    pipe = load_pipeline("synthetic", device="cuda", enable_sync_and_profile=True, generate_ms=5.0)
    assert pipe.device.type == "cuda"
    cache = start(pipe, seed=5)
    for k in range(3):
        frames = pipe.io.output_to_frames(pipe.generate(k, cache, step_input(pipe, None, k)))
        assert np.array_equal(frames.cpu().numpy(), expected_frames(5, k, None))
        stats = pipe.finalize(k, cache)
        assert stats is not None and "mem_alloc_gib" in stats and stats["diffuse_ms"] > 0


def test_undo_generate_lets_the_step_run_again(synth):
    cache = start(synth, seed=5)
    for k in range(2):
        synth.generate(k, cache, step_input(synth, {"x": k}, k))
        synth.finalize(k, cache)
    synth.generate(2, cache, step_input(synth, {"x": 9}, 2))  # a generate whose batch failed
    synth.undo_generate(2, cache)
    with pytest.raises(FinalizeError):  # nothing pending any more
        synth.finalize(2, cache)
    frames = synth.io.output_to_frames(synth.generate(2, cache, step_input(synth, {"x": 2}, 2)))
    np.testing.assert_array_equal(frames.numpy(), expected_frames(5, 2, {"x": 2}))
    first = start(synth, seed=5)
    synth.generate(0, first, step_input(synth, {"x": 0}, 0))
    synth.undo_generate(0, first)
    assert first.autoregressive_index is None and first.final_state is None


def test_served_pipeline_protocol():
    from pipeline.errors import ConfigError
    from pipeline.served import ServedPipeline, as_served

    pipe = load_pipeline("synthetic", device="cpu")
    assert as_served(pipe, "synthetic") is pipe and isinstance(pipe, ServedPipeline)
    assert pipe.name == "synthetic" and pipe.io is pipe.config.io

    class HalfAPipeline:
        device = torch.device("cpu")

        def generate(self, autoregressive_index, cache, input=None): ...

    with pytest.raises(ConfigError, match=r"'pkg:HALF' gave a HalfAPipeline that lacks finalize, "):
        as_served(HalfAPipeline(), "pkg:HALF")


def test_undo_after_a_failed_batch_restores_each_rollouts_noise():
    pipe = load_pipeline("synthetic", device="cpu")
    good, bad = (
        start(pipe, seed=1),
        pipe.io.initialize_session(pipe, pipe.io.validate_options({"fail_at_step": 0}), 2),
    )
    before = good.transformer_cache.generator.get_state().clone()
    inputs = [step_input(pipe, {"x": 0}), step_input(pipe, {"x": 0})]
    with pytest.raises(Exception, match="fail"):
        pipe.generate_batch([0, 0], [good, bad], inputs)
    assert not torch.equal(good.transformer_cache.generator.get_state(), before)  # noise was drawn
    pipe.undo_generate(0, good)
    assert torch.equal(good.transformer_cache.generator.get_state(), before)
    assert good.autoregressive_index is None and good.rng_before_generate is None
