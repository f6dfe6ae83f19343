"""Calibration of layer kinds by shape: the kinds section from the ranks' samples, the
profile it makes, which models and micro-batch sizes `calibrate --model` measures, and the
per-layer micro-benchmark itself on tiny models in this process (torch, no MPI)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from pipesim.calibrate import (
    KIND_FLOP_BUDGET,
    CalibrationSettings,
    build_profile,
    calibration_models,
    kind_microbatch_sizes,
    kinds_section,
)
from pipesim.kindcosts import DIRECTIONS
from pipesim.model import load_model, parse_model
from pipesim.profile import VERSION, parse_profile
from pipesim.runner.config import KindJob, MicrobenchConfig
from pipesim.runner.records import (
    KindSample,
    LinkSample,
    MicrobenchResult,
    OptimizerSample,
    RankSamples,
)
from pipesim.wire import from_dict, to_dict

REPO = Path(__file__).resolve().parents[1]
TINY_CNN = """
name = "tiny-cnn"
input_shape = [3, 8, 8]
[[layers]]
kind = "conv2d"
in_channels = 3
out_channels = 4
kernel = 3
padding = 1
batch_norm = true
[[layers]]
kind = "maxpool"
kernel = 2
stride = 2
[[layers]]
kind = "bottleneck"
in_channels = 4
mid_channels = 2
out_channels = 8
stride = 2
[[layers]]
kind = "avgpool"
[[layers]]
kind = "flatten"
[[layers]]
kind = "fc"
in_features = 8
out_features = 3
activation = "none"
"""
TINY_GPT = """
name = "tiny-gpt"
[[layers]]
kind = "embedding"
vocab_size = 32
hidden = 8
seq_len = 4
max_positions = 4
[[layers]]
kind = "transformer_block"
hidden = 8
heads = 2
repeat = 2
[[layers]]
kind = "lm_head"
hidden = 8
vocab_size = 32
"""


def parse(text: str):
    import tomllib

    return parse_model(tomllib.loads(text))


def samples_for(text: str, job: int, sizes=(1, 4), rank: int = 0, scale: float = 1.0) -> list[KindSample]:
    """Times that grow with the layer's FLOPs and the micro-batch size (two repeats each)."""
    model, samples = parse(text), []
    for i, spec in enumerate(model.layers):
        for b in sizes:
            t = scale * (1e-5 + b * 1e-10 * (spec.forward_flops_per_sample + 1e3))
            samples.append(KindSample(rank, job, i, spec.kind, spec.cost_key, b, (t, 1.1 * t), (2 * t, 2.2 * t),
                                      (t, 1.1 * t), (t, 1.1 * t)))
    return samples


def test_kinds_section_pools_ranks_and_equal_layers_and_fits_laws():
    samples = samples_for(TINY_GPT, 0) + samples_for(TINY_GPT, 0, rank=1, scale=1.2)
    section, worst, noise = kinds_section([parse(TINY_GPT)], samples)
    assert list(section) == ["embedding", "transformer_block", "lm_head"]
    block = section["transformer_block"]["shapes"]
    assert len(block) == 1  # the two blocks share one shape
    pooled = [s.forward_s for s in samples if s.kind == "transformer_block" and s.microbatch_size == 4]
    assert block[0]["forward"][1] == pytest.approx(statistics.median([t for times in pooled for t in times]))
    assert block[0]["microbatch_sizes"] == [1, 4]
    assert set(worst) == {f"{k}_{d}" for k in section for d in DIRECTIONS}
    assert all(value >= 0 for value in noise.values())


def result(samples: list[KindSample]) -> MicrobenchResult:
    optimizer = tuple(OptimizerSample(p, (1e-4 + 3e-9 * p,) * 2) for p in (10**4, 10**5))
    links = tuple(LinkSample((0, 1), n, (1e-6 + n / 1e9,) * 2) for n in (1, 1 << 16, 1 << 20))
    ranks = (RankSamples(0, "h", "h", (), optimizer, links, tuple(s for s in samples if s.rank == 0)),
             RankSamples(1, "h", "h", (), optimizer, (), tuple(s for s in samples if s.rank == 1)))
    return MicrobenchResult(ranks, "Open MPI v5", "2.13.0")


def test_profile_of_kinds_only_has_no_fc_table_and_loads():
    jobs = (KindJob(TINY_CNN, (1, 4)), KindJob(TINY_GPT, (1, 4)))
    samples = samples_for(TINY_CNN, 0) + samples_for(TINY_GPT, 1) + samples_for(TINY_GPT, 1, rank=1)
    raw = from_dict(MicrobenchResult, json.loads(json.dumps(to_dict(result(samples)))))  # as it crosses MPI
    settings = CalibrationSettings(widths=(), message_sizes=(1, 1 << 16, 1 << 20), kind_jobs=jobs)
    data = build_profile(settings, "kinds", raw, [1e-5])
    profile = parse_profile(data)
    assert data["version"] == VERSION and data["compute"] == {} and "fc" not in data["ranges"]
    assert set(profile.kinds) == {"conv2d", "maxpool", "bottleneck", "avgpool", "flatten", "fc", "embedding",
                                  "transformer_block", "lm_head"}
    assert data["metadata"]["kind_models"] == [{"name": "tiny-cnn", "microbatch_sizes": [1, 4]},
                                               {"name": "tiny-gpt", "microbatch_sizes": [1, 4]}]
    assert "kind_jobs" not in data["metadata"]["settings"]


def test_kind_microbatch_sizes_follow_the_flop_budget():
    for name in ("vgg16-mini", "resnet50-mini", "gpt2-mini"):
        model = load_model(REPO / "models" / f"{name}.toml")
        sizes = kind_microbatch_sizes(model)
        flops = sum(x.forward_flops_per_sample for x in model.layers)
        assert sizes[-1] * flops <= KIND_FLOP_BUDGET and len(sizes) >= 2
    assert kind_microbatch_sizes(load_model(REPO / "models" / "gpt2-mini.toml")) == (1, 2, 4)
    assert kind_microbatch_sizes(load_model(REPO / "models" / "vgg16.toml")) == (1, 2)  # at least two


def test_calibration_models_split_fc_widths_from_kind_jobs():
    models = [str(REPO / "models" / name) for name in ("fc32.toml", "uneven.toml", "vgg16-mini.toml")]
    widths, jobs = calibration_models(models, log=lambda _: None)
    assert widths == (256, 512, 1024)
    assert len(jobs) == 1 and jobs[0].model_toml == (REPO / "models" / "vgg16-mini.toml").read_text()


class _Comm:
    def Barrier(self):
        pass

    def Get_rank(self):
        return 0


def test_kindbench_times_every_layer_of_tiny_models():
    pytest.importorskip("torch", reason="the runner extra is not installed")
    from pipesim.runner.kindbench import measure_kinds

    config = MicrobenchConfig((), (), (), 1, 0, 1, 1, "sgd", 0, 1,
                              kind_jobs=(KindJob(TINY_CNN, (1, 2)), KindJob(TINY_GPT, (2,))),
                              kind_repeats=2, kind_warmup=1)
    samples = measure_kinds(config, _Comm(), log=lambda _: None)
    assert len(samples) == 6 * 2 + 4
    for s in samples:
        assert len(s.forward_s) == 2 and all(t >= 0 for d in DIRECTIONS for t in s.times_s(d))
        assert all(t > 0 for t in s.forward_s + s.backward_s)
        if s.kind in ("maxpool", "avgpool", "flatten"):
            assert s.weight_s == (0.0, 0.0)  # no parameters, no W
        if s.kind in ("conv2d", "bottleneck", "transformer_block", "lm_head"):
            assert all(t > 0 for t in s.input_s + s.weight_s)
    embedding = next(s for s in samples if s.kind == "embedding")
    assert embedding.input_s == (0.0, 0.0) and embedding.weight_s == embedding.backward_s


def test_a_tiny_kinds_calibration_over_mpi_makes_a_profile_that_loads():
    """Both ranks measure the kinds for real (mpiexec), the samples come back typed, and
    the profile holds every kind of the two models and no fc table."""
    pytest.importorskip("mpi4py", reason="the runner extra is not installed")
    from pipesim.calibrate import calibrate

    settings = CalibrationSettings(widths=(), message_sizes=(1, 1 << 16), pingpong_repeats=2, repeats=1, warmup=1,
                                   overhead_iterations=2, kind_repeats=2, kind_warmup=1,
                                   kind_jobs=(KindJob(TINY_CNN, (1, 2)), KindJob(TINY_GPT, (1,))))
    data = calibrate(settings, "tiny-kinds", log=lambda _: None)
    profile = parse_profile(data)
    assert data["compute"] == {} and len(data["metadata"]["processors"]) == 2
    assert set(profile.kinds) == {"conv2d", "maxpool", "bottleneck", "avgpool", "flatten", "fc", "embedding",
                                  "transformer_block", "lm_head"}
    assert profile.kinds["conv2d"].shapes[0].microbatch_sizes == (1, 2)
    assert all(s.seconds["forward"][0] > 0 for k in profile.kinds.values() for s in k.shapes)
