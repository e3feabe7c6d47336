"""Config derivation, registry and import-path loading, scheduler, KV cache, devices, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline import (
    ConfigError,
    FlowMatchEulerScheduler,
    FlowMatchEulerSchedulerConfig,
    InputError,
    PipelineNotFoundError,
    SlidingWindowKVCache,
    StreamInferencePipeline,
    available_pipelines,
    derive_config,
    load_pipeline,
    parse_overrides,
    resolve_device,
    resolve_dtype,
)
from pipeline.errors import BatchError
from pipeline.synthetic import expected_frames, synthetic_config
from tests.external_pipeline import COUNTER_CONFIG


# ---- derive_config ---------------------------------------------------------------------------
def test_derive_config_nested_paths_and_original_untouched():
    base = synthetic_config()
    d = derive_config(
        base,
        diffusion_model__transformer__width=128,
        **{"diffusion_model.scheduler.num_steps": 3},
        generate_ms=40.0,
    )
    assert d.diffusion_model.transformer.width == 128
    assert d.diffusion_model.scheduler.num_steps == 3
    assert d.diffusion_model.transformer.generate_ms == 40.0
    assert base.diffusion_model.transformer.width == 64
    assert base.diffusion_model.transformer.generate_ms == 0.0


def test_derive_config_unknown_key_lists_fields():
    with pytest.raises(ConfigError, match=r"unknown config key 'diffusion_model\.nope'.*fields:.*scheduler"):
        derive_config(synthetic_config(), **{"diffusion_model.nope": 1})
    with pytest.raises(ConfigError, match=r"unknown config key 'bogus'.*keys: batch_cost, .*generate_ms"):
        derive_config(synthetic_config(), bogus=1)


def test_derive_config_types_values_by_field():
    d = derive_config(synthetic_config(), generate_ms="40", width="128", name="123", seed="none")
    transformer = d.diffusion_model.transformer
    assert (transformer.generate_ms, transformer.width, d.name) == (40.0, 128, "123")
    assert d.diffusion_model.seed is None
    assert derive_config(synthetic_config(), enable_sync_and_profile="true").enable_sync_and_profile is True
    with pytest.raises(ConfigError, match=r"config key 'width' takes int, got 'abc'"):
        derive_config(synthetic_config(), width="abc")
    with pytest.raises(ConfigError, match=r"config key 'width' takes int, got 1.5"):
        derive_config(synthetic_config(), width=1.5)


def test_derive_config_through_none_and_into_leaf():
    with pytest.raises(ConfigError, match="is None"):
        derive_config(synthetic_config(), **{"encoder": None, "name": "x"}, encoder__foo=1)
    with pytest.raises(ConfigError, match="not a config dataclass"):
        derive_config(synthetic_config(), name__x=1)


def test_parse_overrides():
    # Values stay text; derive_config types them by the field they set.
    assert parse_overrides(["generate_ms=40", " name = a=b", "x="]) == {
        "generate_ms": "40",
        "name": " a=b",
        "x": "",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["generate_ms"])


# ---- registry --------------------------------------------------------------------------------
def test_registry_names_and_overrides():
    assert {"synthetic", "tiny-world"} <= set(available_pipelines())
    pipe = load_pipeline("synthetic", frames_per_step=4, width=32, device="cpu")
    assert isinstance(pipe, StreamInferencePipeline)
    spec = pipe.io.stream_spec(pipe, pipe.io.validate_options({}))
    assert (spec.frames_per_step, spec.width, spec.height) == (4, 32, 64)


def test_registry_unknown_override_and_name():
    with pytest.raises(ConfigError, match="unknown config key 'generate_msec'"):
        load_pipeline("synthetic", generate_msec=3)
    with pytest.raises(PipelineNotFoundError, match=r"neither a registered pipeline.*package\.module:ATTR"):
        load_pipeline("no-such-model")


def test_import_path_config_object():
    pipe = load_pipeline("tests.external_pipeline:COUNTER_CONFIG")
    cache = pipe.initialize_cache(transformer_context={"seed": 0})
    assert pipe.generate(0, cache, torch.tensor(2.0)).shape == (1, 4, 4)
    pipe = load_pipeline("tests.external_pipeline:COUNTER_CONFIG", size=6)
    assert pipe.generate(0, pipe.initialize_cache(), None).shape == (1, 6, 6)
    assert COUNTER_CONFIG.diffusion_model.transformer.size == 4  # overrides never mutate


def test_import_path_factories():
    pipe = load_pipeline("tests.external_pipeline:counter_factory")
    assert pipe.generate(0, pipe.initialize_cache(), None).shape == (1, 2, 2)
    ready = load_pipeline("tests.external_pipeline:ready_pipeline")
    assert ready.generate(0, ready.initialize_cache(), None).shape == (1, 3, 3)
    with pytest.raises(ConfigError, match="returns a ready pipeline; overrides"):
        load_pipeline("tests.external_pipeline:ready_pipeline", size=5)


def test_import_path_errors():
    with pytest.raises(PipelineNotFoundError, match="cannot import module 'nope_mod'"):
        load_pipeline("nope_mod:thing")
    with pytest.raises(PipelineNotFoundError, match="has no attribute 'MISSING'"):
        load_pipeline("tests.external_pipeline:MISSING")
    with pytest.raises(ConfigError, match="expected a config with setup"):
        load_pipeline("tests.external_pipeline:NOT_A_PIPELINE")


def test_external_pipeline_gets_default_io():
    pipe = load_pipeline("tests.external_pipeline:COUNTER_CONFIG")
    io = pipe.io
    action = io.validate_action({"input": [1.0]})
    assert io.action_to_input(action, 0).tolist() == [1.0]
    with pytest.raises(ValidationError, match="input"):
        io.validate_action({"wrong": 1})


# ---- scheduler -------------------------------------------------------------------------------
def test_flow_match_sigmas():
    s = FlowMatchEulerScheduler(FlowMatchEulerSchedulerConfig(num_steps=4, shift=1.0))
    assert s.sigmas == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    s3 = FlowMatchEulerScheduler(FlowMatchEulerSchedulerConfig(num_steps=2, shift=3.0))
    assert s3.sigmas == pytest.approx([1.0, 0.75, 0.0])  # 3*.5/(1+2*.5)
    s_explicit = FlowMatchEulerScheduler(FlowMatchEulerSchedulerConfig(timesteps=(0.9, 0.4)))
    assert s_explicit.sigmas == [0.9, 0.4, 0.0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"shift": 0.0}, "shift"),
        ({"timesteps": (0.2, 0.5)}, "descending"),
    ],
)
def test_flow_match_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FlowMatchEulerScheduler(FlowMatchEulerSchedulerConfig(**kwargs))


def test_euler_is_exact_for_straight_flow():
    s = FlowMatchEulerScheduler(FlowMatchEulerSchedulerConfig(num_steps=3, shift=2.0))
    x0 = torch.randn(2, 5)
    eps = torch.randn(2, 5)
    out = s.sample(eps, lambda x, t: eps - x0)
    torch.testing.assert_close(out, x0)
    torch.testing.assert_close(s.add_noise(x0, 0.25, eps), 0.75 * x0 + 0.25 * eps)


# ---- KV cache --------------------------------------------------------------------------------
def _kv(value: float, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    t = torch.full((1, 1, 2, 3), value)
    return [(t, -t) for _ in range(layers)]


def test_kv_cache_sliding_window_with_sink():
    c = SlidingWindowKVCache(
        num_layers=2, num_heads=1, head_dim=3, tokens_per_frame=2, window_frames=2, sink_frames=1
    )
    storage = c.storage
    for f in range(5):
        c.append_frame(_kv(float(f)))
    assert c.num_frames == 3 and c.frames_seen == 5
    assert c.frame_positions() == [0, 3, 4]  # sink frame 0 kept, window holds the last two
    assert c.keys(1)[0, 0, :, 0].tolist() == [0, 0, 3, 3, 4, 4]
    assert c.values(0)[0, 0, :, 0].tolist() == [0, 0, -3, -3, -4, -4]
    assert c.storage is storage  # reused, never reallocated


def test_kv_cache_partial_fill_and_errors():
    c = SlidingWindowKVCache(num_layers=2, num_heads=1, head_dim=3, tokens_per_frame=2, window_frames=4)
    c.append_frame(_kv(1.0))
    assert c.keys(0).shape == (1, 1, 2, 3)
    with pytest.raises(InputError, match="expected K/V for 2 layers"):
        c.append_frame(_kv(1.0, layers=1))
    with pytest.raises(InputError, match="window_frames"):
        SlidingWindowKVCache(num_layers=1, num_heads=1, head_dim=1, tokens_per_frame=1, window_frames=0)


def test_kv_cache_stack_and_copy_back():
    mk = lambda: SlidingWindowKVCache(  # noqa: E731
        num_layers=2, num_heads=1, head_dim=3, tokens_per_frame=2, window_frames=2
    )
    a, b = mk(), mk()
    for f in range(3):
        a.append_frame(_kv(float(f)))
        b.append_frame(_kv(float(10 + f)))
    s = SlidingWindowKVCache.stack([a, b])
    assert s.storage.shape[2] == 2
    kv = [(torch.cat([k, k + 100]), torch.cat([v, v + 100])) for k, v in _kv(7.0)]
    s.append_frame(kv)
    s.copy_into([a, b])
    assert a.keys(0)[0, 0, :, 0].tolist() == [2, 2, 7, 7]
    assert b.keys(0)[0, 0, :, 0].tolist() == [12, 12, 107, 107]
    assert a.frames_seen == 4 and b.frames_seen == 4
    short = mk()
    short.append_frame(_kv(0.0))
    with pytest.raises(BatchError, match="different numbers of frames"):
        SlidingWindowKVCache.stack([a, short])
    with pytest.raises(BatchError, match="empty"):
        SlidingWindowKVCache.stack([])


# ---- devices ---------------------------------------------------------------------------------
def test_device_and_dtype_resolution():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


# ---- synthetic: determinism and the batch protocol -------------------------------------------
def _run(pipe, seeds, actions_per_step, batched: bool):
    io = pipe.io
    caches = [io.initialize_session(pipe, io.validate_options({}), s) for s in seeds]
    frames: list[list[np.ndarray]] = [[] for _ in seeds]
    for k, actions in enumerate(actions_per_step):
        inputs = [io.action_to_input(io.validate_action(a), k) for a in actions]
        if batched:
            outs = pipe.generate_batch([k] * len(seeds), caches, inputs)
            pipe.finalize_batch([k] * len(seeds), caches)
        else:
            outs = []
            for c, x in zip(caches, inputs, strict=True):
                outs.append(pipe.generate(k, c, x))
                pipe.finalize(k, c)
        for i, o in enumerate(outs):
            frames[i].append(io.output_to_frames(o).numpy())
    return frames


def test_synthetic_batch_equals_alone_exactly():
    pipe = load_pipeline("synthetic", frames_per_step=2, device="cpu")
    seeds = [1, 2, 3, 2**40]
    acts = [[{"x": k + i, "y": -i} for i in range(len(seeds))] for k in range(4)]
    alone = _run(pipe, seeds, acts, batched=False)
    batched = _run(pipe, seeds, acts, batched=True)
    for i, seed in enumerate(seeds):
        for k in range(4):
            assert np.array_equal(alone[i][k], batched[i][k])
            assert np.array_equal(alone[i][k], expected_frames(seed, k, acts[k][i], frames_per_step=2))


def test_synthetic_batch_of_sessions_at_different_steps():
    pipe = load_pipeline("synthetic", device="cpu")
    io = pipe.io
    a = io.initialize_session(pipe, io.validate_options({}), 5)
    b = io.initialize_session(pipe, io.validate_options({}), 6)
    for k in range(3):
        pipe.generate(k, a, io.action_to_input(None, k))
        pipe.finalize(k, a)
    outs = pipe.generate_batch([3, 0], [a, b], [io.action_to_input(None, 0)] * 2)
    assert np.array_equal(outs[0].numpy(), expected_frames(5, 3, None))
    assert np.array_equal(outs[1].numpy(), expected_frames(6, 0, None))
    pipe.finalize_batch([3, 0], [a, b])
    assert a.autoregressive_index == 3 and a.final_state is None and b.final_state is None


def test_generate_batch_validates_everything_first():
    pipe = load_pipeline("synthetic", device="cpu")
    io = pipe.io
    a = io.initialize_session(pipe, io.validate_options({}), 1)
    b = io.initialize_session(pipe, io.validate_options({}), 2)
    from pipeline import AutoregressiveOrderError

    with pytest.raises(AutoregressiveOrderError):
        pipe.generate_batch([0, 1], [a, b], [io.action_to_input(None, 0)] * 2)
    assert a.autoregressive_index is None  # nothing ran for the valid rollout either
    with pytest.raises(InputError, match="same cache twice"):
        pipe.generate_batch([0, 0], [a, a], [io.action_to_input(None, 0)] * 2)
    with pytest.raises(InputError, match="one index, cache and input"):
        pipe.generate_batch([0], [a, b], [None, None])


def test_synthetic_seeds_give_different_frames():
    pipe = load_pipeline("synthetic", device="cpu")
    f = _run(pipe, [1, 2], [[None, None]], batched=False)
    assert not np.array_equal(f[0][0], f[1][0])


def test_synthetic_action_schema_is_strict():
    io = load_pipeline("synthetic", device="cpu").io
    for bad in ({"x": "1"}, {"x": 1.5}, {"z": 1}, {"x": 10**6}, [1, 2]):
        with pytest.raises(ValidationError):
            io.validate_action(bad)
    assert io.validate_action({"x": 3}).model_dump() == {"x": 3, "y": 0}
    schema = io.action_model.model_json_schema()
    assert schema["additionalProperties"] is False


def test_cache_nbytes_counts_each_storage_once():
    from pipeline.memory import cache_nbytes

    kv = SlidingWindowKVCache(num_layers=2, num_heads=1, head_dim=4, tokens_per_frame=2, window_frames=3)
    t = torch.zeros(10)
    assert cache_nbytes({"kv": kv, "a": t, "b": t[2:], "l": [t]}) == kv.nbytes + 40
    assert kv.nbytes == 2 * 2 * 1 * 1 * 6 * 4 * 4
    pipe = load_pipeline("synthetic", device="cpu")
    cache = pipe.io.initialize_session(pipe, pipe.io.validate_options({}), 1)
    assert cache_nbytes(cache) == 16  # seed + absorbed counters (int64 each)


@pytest.mark.parametrize("bad", [[[1, 2], [3]], [["a"]], [[1, [2]]], ["1"], [None]])
def test_tensor_action_refuses_what_torch_cannot_take(bad):
    from pydantic import ValidationError

    from pipeline.io import TensorIO

    io = TensorIO()
    assert io.action_to_input(io.validate_action({"input": [[1, 2], [3, 4.5]]}), 0).shape == (2, 2)
    with pytest.raises(ValidationError, match="rectangular nested list of numbers"):
        io.validate_action({"input": bad})
