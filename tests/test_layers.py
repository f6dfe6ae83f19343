"""The layer-kind registry against torch: every kind's spec (parameters, output shape,
FLOPs, bytes saved for backward) equals what its torch.nn module has and does, and the
shipped models have their published sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesim.layers import KINDS, LAYER_KINDS
from pipesim.model import ModelError, ModelSpec, layer, layer_table, load_model, parse_model

torch = pytest.importorskip("torch")
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"

# One or two small instances of every kind: (kind, input shape or None, fields).
EXAMPLES = {
    "fc-relu": ("fc", None, {"in_features": 24, "out_features": 40}),
    "fc-none": ("fc", None, {"in_features": 40, "out_features": 10, "activation": "none"}),
    "conv2d": ("conv2d", (3, 20, 20), {"in_channels": 3, "out_channels": 8, "kernel": 3, "padding": 1}),
    "conv2d-bn-stride": ("conv2d", (4, 33, 33), {"in_channels": 4, "out_channels": 16, "kernel": 5, "stride": 2,
                                                     "padding": 2, "batch_norm": True}),
    "maxpool": ("maxpool", (8, 16, 16), {"kernel": 2, "stride": 2}),
    "maxpool-padded": ("maxpool", (8, 15, 15), {"kernel": 3, "stride": 2, "padding": 1}),
    "avgpool": ("avgpool", (32, 7, 7), {}),
    "flatten": ("flatten", (8, 5, 5), {}),
    "bottleneck-shortcut": ("bottleneck", (16, 16, 16), {"in_channels": 16, "mid_channels": 8, "out_channels": 32,
                                                             "stride": 2}),
    "bottleneck-identity": ("bottleneck", (32, 8, 8), {"in_channels": 32, "mid_channels": 8, "out_channels": 32}),
    "embedding": ("embedding", None, {"vocab_size": 100, "hidden": 32, "seq_len": 12, "max_positions": 16}),
    "embedding-no-positions": ("embedding", None, {"vocab_size": 100, "hidden": 32, "seq_len": 12}),
    "transformer_block": ("transformer_block", (16, 32), {"hidden": 32, "heads": 4}),
    "lm_head": ("lm_head", (16, 32), {"hidden": 32, "vocab_size": 50}),
    "lm_head-no-norm": ("lm_head", (16, 32), {"hidden": 32, "vocab_size": 50, "layer_norm": False}),
}


def spec_of(name):
    kind, shape, fields = EXAMPLES[name]
    return layer(kind, shape, **fields)


def test_every_kind_has_an_example():
    assert {EXAMPLES[n][0] for n in EXAMPLES} == set(LAYER_KINDS)


def sample_input(spec, batch, generator=None):
    shape = (batch, *spec.input_shape)
    if spec.input_dtype == "int64":
        vocab = spec.options["vocab_size"]
        return torch.randint(0, vocab, shape, generator=generator)
    return torch.randn(shape, generator=generator).requires_grad_()  # as a pipeline stage's input


def build(specs, seed=0):
    torch.manual_seed(seed)
    return [spec.module() for spec in specs]


def saved_bytes(modules, x) -> int:
    """Bytes autograd saves running ``modules`` on ``x``: unique storages, parameters
    excluded (as pipesim/runner/interpreter.py SavedBytes counts them)."""
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for module in modules:
            x = module(x)
    return sum(storages.values())


def saved_per_sample(specs, modules) -> float:
    """Per-sample saved bytes: the growth from batch 2 to batch 4, halved. This leaves out
    what does not grow with the batch (batch-norm's per-channel statistics)."""
    generator = torch.Generator().manual_seed(1)
    small, large = (saved_bytes(modules, sample_input(specs[0], b, generator)) for b in (2, 4))
    return (large - small) / 2


@pytest.mark.parametrize("name", EXAMPLES)
def test_params_output_shape_and_dtype_match_torch(name):
    spec = spec_of(name)
    (module,) = build([spec])
    assert sum(p.numel() for p in module.parameters()) == spec.params
    out = module(sample_input(spec, 3))
    assert tuple(out.shape) == (3, *spec.output_shape)
    assert out.dtype == {"float32": torch.float32, "int64": torch.int64}[spec.output_dtype]
    assert spec.output_bytes_per_sample == out[0].numel() * out.element_size()


@pytest.mark.parametrize("name", EXAMPLES)
def test_matmul_flops_match_torch_flop_counter(name):
    """FlopCounterMode counts 2 x multiply-adds of mm/addmm/bmm/convolution, as the spec's
    matmul_flops does; the spec's forward FLOPs add elementwise work on top."""
    spec = spec_of(name)
    (module,) = build([spec])
    with FlopCounterMode(display=False) as counter:
        module(sample_input(spec, 3))
    assert counter.get_total_flops() == 3 * spec.matmul_flops_per_sample
    assert spec.forward_flops_per_sample >= spec.matmul_flops_per_sample


@pytest.mark.parametrize("name", EXAMPLES)
def test_saved_bytes_match_autograd_per_kind(name):
    spec = spec_of(name)
    modules = build([spec])
    expected = ModelSpec("one", (spec,)).stage_saved_bytes(0, 0)
    assert saved_per_sample([spec], modules) == pytest.approx(expected, rel=0.01)


MINI = ["vgg16-mini", "resnet50-mini", "gpt2-mini"]


def stage_ranges(n):
    return [(0, n - 1), *((i, i) for i in range(n)), *((i, i + 1) for i in range(n - 1)), (1, n - 2)]


@pytest.mark.parametrize("name", MINI)
def test_saved_bytes_match_autograd_per_stage_of_mini_models(name):
    """Stages of several layers count a tensor shared by two layers once (stage_saved_bytes)."""
    model = load_model(MODELS / f"{name}.toml")
    modules = build(model.layers)
    for first, last in stage_ranges(model.num_layers):
        measured = saved_per_sample(model.layers[first:], modules[first : last + 1])
        assert measured == pytest.approx(model.stage_saved_bytes(first, last), rel=0.01), (first, last)


@pytest.mark.parametrize("name", MINI)
def test_mini_models_train_one_step_on_cpu(name):
    model = load_model(MODELS / f"{name}.toml")
    net = torch.nn.Sequential(*build(model.layers))
    x = sample_input(model.layers[0], 2)
    out = net(x)
    assert tuple(out.shape) == (2, *model.layers[-1].output_shape)
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


# --- what I keeps until W, as torch's split backward (the runner's I and W) keeps it -------


def kept_after_input_gradient(specs, modules, batch, generator) -> tuple[int, int]:
    """Run F, then torch's ``stage_backward_input`` as the runner's I does, drop the output:
    (bytes of F's saved tensors still alive, unique storages, parameters excluded; bytes of
    the gradients I keeps for W, summed as the runner's ledger sums them)."""
    import gc
    import weakref

    from torch.distributed.pipelining._backward import stage_backward_input

    params = [p for m in modules for p in m.parameters()]
    exclude = {p.untyped_storage().data_ptr() for p in params}
    refs = []

    def pack(tensor):  # a detached alias: saving the tensor itself would tie it to its own node in a cycle
        alias = tensor.detach()
        if alias.untyped_storage().data_ptr() not in exclude:
            refs.append(weakref.ref(alias))
        return alias

    x = sample_input(specs[0], batch, generator)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = x
        for module in modules:
            out = module(out)
    _, groups = stage_backward_input([out], [torch.randn_like(out)], [x], iter(params))
    del x, out
    gc.collect(0)
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in refs)
             if t is not None}
    grads = sum(g.numel() * g.element_size() for group in groups for grad in group.get("grads") or ()
                for g in grad or () if g is not None)
    return sum(alive.values()), grads


def kept_per_sample(specs, modules) -> float:
    generator = torch.Generator().manual_seed(2)
    (a1, g1), (a2, g2) = (kept_after_input_gradient(specs, modules, b, generator) for b in (1, 2))
    return a2 - a1 + g2 - g1  # per sample: what does not grow with the batch drops out


# The embedding is left out: its input, token ids, carries no gradient, and torch's split
# backward then finds no parametrised op to keep anything for (test below).
SPLIT_EXAMPLES = [n for n in EXAMPLES if EXAMPLES[n][0] != "embedding"]


@pytest.mark.parametrize("name", SPLIT_EXAMPLES)
def test_weight_bytes_match_torch_split_backward_per_kind(name):
    spec = spec_of(name)
    expected = ModelSpec("one", (spec,)).stage_weight_bytes(0, 0)
    assert kept_per_sample([spec], build([spec])) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("name", ["vgg16-mini", "resnet50-mini", "gpt2-mini"])
def test_weight_bytes_match_torch_split_backward_per_stage_of_mini_models(name):
    model = load_model(MODELS / f"{name}.toml")
    modules = build(model.layers)
    first_float = 1 if model.layers[0].input_dtype == "int64" else 0
    n = model.num_layers
    ranges = [(first_float, n - 1), (first_float, n // 2), (n // 2, n - 1),
              *((i, min(i + 2, n - 1)) for i in range(first_float, n - 1))]
    for first, last in ranges:
        measured = kept_per_sample(model.layers[first:], modules[first : last + 1])
        assert measured == pytest.approx(model.stage_weight_bytes(first, last), rel=0.01), (first, last)


def test_torch_split_backward_computes_no_weight_gradient_behind_token_ids():
    """What the runner must work around for a piece that starts with an embedding: given
    token ids, stage_backward_input finds no parameter group, so stage_backward_weight
    leaves every weight of the piece without a gradient (run such a piece's backward whole)."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    model = load_model(MODELS / "gpt2-mini.toml")
    piece = torch.nn.Sequential(*build(model.layers[:2]))
    ids = sample_input(model.layers[0], 2)
    out = piece(ids)
    _, groups = stage_backward_input([out], [torch.ones_like(out)], [ids], piece.parameters())
    stage_backward_weight(piece.parameters(), groups)
    assert groups == [] and all(p.grad is None for p in piece.parameters())


# --- the full-size models, counted on the meta device ----------------------------------

FULL = {  # name: (parameters, multiply-adds per sample or None)
    "vgg16": (138_357_544, 15.47e9),
    "resnet50": (25_557_032, 4.09e9),
    "gpt2-small": (163_037_184, None),
}
ALL_MODELS = sorted(p.stem for p in MODELS.glob("*.toml"))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_file_matches_its_torch_modules(name):
    """Parameters per layer equal the torch modules' (built on the meta device: nothing is
    allocated), and the matmul FLOPs of a forward pass equal torch's flop counter."""
    model = load_model(MODELS / f"{name}.toml")
    with torch.device("meta"):
        modules = [spec.module() for spec in model.layers]
        x = torch.zeros((2, *model.layers[0].input_shape),
                        dtype=torch.int64 if model.layers[0].input_dtype == "int64" else torch.float32)
        with FlopCounterMode(display=False) as counter:
            for spec, module in zip(model.layers, modules, strict=True):
                assert sum(p.numel() for p in module.parameters()) == spec.params, spec.kind
                x = module(x)
                assert tuple(x.shape[1:]) == spec.output_shape, spec.kind
    assert counter.get_total_flops() == 2 * sum(x.matmul_flops_per_sample for x in model.layers)


@pytest.mark.parametrize("name", FULL)
def test_full_models_have_their_published_sizes(name):
    params, macs = FULL[name]
    model = load_model(MODELS / f"{name}.toml")
    assert model.params == params
    if macs is not None:  # published counts are convolution + linear multiply-adds
        assert sum(x.matmul_flops_per_sample for x in model.layers) / 2 == pytest.approx(macs, rel=0.01)
        assert sum(x.forward_flops_per_sample for x in model.layers) / 2 == pytest.approx(macs, rel=0.01)


def test_gpt2_small_untied_count_is_the_tied_count_plus_the_head():
    model = load_model(MODELS / "gpt2-small.toml")
    head = model.layers[-1]
    assert head.kind == "lm_head"
    vocab, hidden = head.options["vocab_size"], head.options["hidden"]
    assert model.params - vocab * hidden == 124_439_808  # GPT-2 small with tied embeddings


def test_vgg16_first_fc_layer_holds_most_parameters():
    model = load_model(MODELS / "vgg16.toml")
    fc1 = next(x for x in model.layers if x.kind == "fc")
    assert fc1.params / model.params == pytest.approx(0.74, abs=0.005)


# --- the per-layer table --------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50", "gpt2-mini", "fc32"])
def test_layer_table_rows_sum_to_the_model(name):
    model = load_model(MODELS / f"{name}.toml")
    rows = layer_table(model)
    assert [r.kind for r in rows] == [x.kind for x in model.layers]
    assert sum(r.params for r in rows) == model.params
    assert sum(r.saved_bytes_per_sample for r in rows) == model.stage_saved_bytes(0, model.num_layers - 1)
    assert [r.message_bytes_per_sample for r in rows[:-1]] == [x.output_bytes_per_sample for x in model.layers[:-1]]
    assert rows[-1].message_bytes_per_sample is None


def test_resnet50_table_shapes():
    rows = layer_table(load_model(MODELS / "resnet50.toml"))
    assert rows[0].output_shape == (64, 112, 112)
    assert rows[1].output_shape == (64, 56, 56)
    assert rows[-3].output_shape == (2048, 1, 1)
    assert rows[-1].output_shape == (1000,)
    assert rows[2].message_bytes_per_sample == 256 * 56 * 56 * 4


def test_cost_key_names_kind_config_and_input_shape():
    a = layer("conv2d", (3, 32, 32), in_channels=3, out_channels=8, kernel=3, padding=1)
    b = layer("conv2d", (3, 64, 64), in_channels=3, out_channels=8, kernel=3, padding=1)
    assert a.cost_key.startswith("conv2d(") and a.cost_key.endswith("@3x32x32")
    assert a.cost_key != b.cost_key
    assert layer("fc", in_features=4, out_features=4).cost_key == "fc(activation=relu,in_features=4,out_features=4)@4"


# --- strict keys and bad values ---------------------------------------------------------

IMAGE = 'name = "m"\ninput_shape = [3, 8, 8]\n'
CONV = '[[layers]]\nkind = "conv2d"\nin_channels = 3\nout_channels = 4\nkernel = 3\n'


@pytest.mark.parametrize("text, expected", [
    (IMAGE + CONV + "dilation = 2\n", "unknown key 'dilation' for kind conv2d"),
    (IMAGE + '[[layers]]\nkind = "conv2d"\nin_channels = 3\nkernel = 3\n', "missing field 'out_channels'"),
    (IMAGE + CONV + "batch_norm = 1\n", "'batch_norm' must be true or false"),
    (IMAGE + CONV + "kernel_size = 3\n", "unknown key 'kernel_size'"),
    (IMAGE + CONV.replace("kernel = 3", "kernel = 0"), "'kernel' must be an integer in 1..1024"),
    (IMAGE + CONV.replace("kernel = 3", "kernel = 9"), "does not fit an input of 8"),
    (IMAGE + CONV.replace("in_channels = 3", "in_channels = 5"), "in_channels 5 does not match the input's 3"),
    ('name = "m"\n' + CONV, "needs an input shape"),
    ('name = "m"\ninput_shape = [3, 0]\n' + CONV, "'input_shape' must be a list of 1 to 4 integers"),
    ('name = "m"\ninput_shape = "3x8x8"\n' + CONV, "'input_shape' must be a list"),
    (IMAGE + CONV + "repeat = 2\n", "repeat needs an output shape equal to its input shape"),
    (IMAGE + CONV + '[[layers]]\nkind = "fc"\nin_features = 144\nout_features = 4\n', "put a flatten layer"),
    (IMAGE + CONV + '[[layers]]\nkind = "flatten"\n[[layers]]\nkind = "fc"\nin_features = 100\nout_features = 4\n',
     "in_features 100 does not match the previous layer's out_features 144"),
    (IMAGE + '[[layers]]\nkind = "maxpool"\nkernel = 2\nstride = 2\npadding = 2\n', "at most half the kernel"),
    (IMAGE + '[[layers]]\nkind = "maxpool"\nkernel = 2\n', "missing field 'stride'"),
    (IMAGE + '[[layers]]\nkind = "avgpool"\nsize = 1\n', "unknown key 'size' for kind avgpool"),
    ('name = "m"\n[[layers]]\nkind = "fc"\nin_features = 4\nout_features = 4\nactivation = "gelu"\n',
     "'activation' must be one of relu, none"),
    ('name = "m"\n[[layers]]\nkind = "embedding"\nvocab_size = 10\nhidden = 8\nseq_len = 20\nmax_positions = 16\n',
     "seq_len 20 is beyond max_positions 16"),
    ('name = "m"\ninput_shape = [16, 30]\n[[layers]]\nkind = "transformer_block"\nhidden = 30\nheads = 4\n',
     "hidden 30 is not a multiple of heads 4"),
    ('name = "m"\ninput_shape = [16, 32]\n[[layers]]\nkind = "transformer_block"\nhidden = 64\nheads = 4\n',
     "hidden 64 does not match the input's hidden size 32"),
    (('name = "m"\n[[layers]]\nkind = "fc"\nin_features = 4\nout_features = 4\n[[layers]]\nkind = "embedding"\n'
     'vocab_size = 10\nhidden = 8\nseq_len = 4\n'), "takes int64 input, but the previous layer gives float32"),
    ('name = "m"\n[[layers]]\nkind = "lm_head"\nhidden = 8\nvocab_size = 10\n', "needs an input shape"),
    ('name = "m"\n[[layers]]\nkind = "resnet"\n', "kind must be one of fc, conv2d, maxpool"),
    (('name = "m"\n[[layers]]\nkind = "fc"\nin_features = 1048576\nout_features = 1048576\n[[layers]]\n'
     'kind = "fc"\nin_features = 1048576\nout_features = 1048576\n'), "fc layer is too large"),
    ('name = "m"\n[fc]\nnum_layers = 2\nwidth = 4\ninput_shape = [4]\n', "unknown key 'input_shape'"),
    ('name = "m"\ninput_shape = [4]\n[fc]\nnum_layers = 2\nwidth = 4\n', "input_shape goes with [[layers]]"),
    ('name = "m"\nlayers = [3]\n', "expected a table, got 3"),
])
def test_bad_layer_tables_are_one_line_model_errors(tmp_path, text, expected):
    path = tmp_path / "model.toml"
    path.write_text(text)
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert str(path) in message


def test_repeat_of_a_shape_keeping_kind(tmp_path):
    model = parse_model({"name": "m", "input_shape": [8, 6, 6], "layers": [
        {"kind": "conv2d", "in_channels": 8, "out_channels": 8, "kernel": 3, "padding": 1, "repeat": 3},
        {"kind": "bottleneck", "in_channels": 8, "mid_channels": 2, "out_channels": 8, "repeat": 2}]})
    assert [x.kind for x in model.layers] == ["conv2d"] * 3 + ["bottleneck"] * 2
    assert all(x.output_shape == (8, 6, 6) for x in model.layers)


def test_every_registered_kind_states_its_fields_once():
    for kind in KINDS.values():
        assert len(set(kind.keys)) == len(kind.keys)
        assert not {"kind", "repeat"} & set(kind.keys)


def test_models_readme_lists_every_kind_field_and_model():
    text = (MODELS / "README.md").read_text()
    for kind in KINDS.values():
        assert f"| `{kind.name}` |" in text
        row = next(line for line in text.splitlines() if line.startswith(f"| `{kind.name}` |"))
        assert all(f"`{key}`" in row for key in kind.keys), kind.name
    for name in ALL_MODELS:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}.toml` |"))
        assert f"{load_model(MODELS / f'{name}.toml').params:,}" in row, name


def test_features_are_an_fc_notion():
    """Code that still rebuilds every layer as fc from (in_features, out_features) gets a
    one-line error for other kinds, never a silently different model."""
    conv = layer("conv2d", (3, 8, 8), in_channels=3, out_channels=4, kernel=3)
    with pytest.raises(ModelError, match="a conv2d layer has no in_features"):
        conv.in_features  # noqa: B018
    with pytest.raises(ModelError, match="has no out_features"):
        load_model(MODELS / "gpt2-mini.toml").output_features  # noqa: B018
    assert load_model(MODELS / "vgg16-mini.toml").output_features == 10


def test_a_seeded_module_is_the_same_wherever_it_is_built():
    spec = spec_of("transformer_block")
    state = torch.random.get_rng_state()
    a, b, c = spec.module(seed=7), spec.module(seed=7), spec.module(seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb)
        if pa.numel() > 1 and pa.std() > 0:
            assert not torch.equal(pa, pc)


# --- any table of any kind: a model or a one-line ModelError, never a traceback ----------

ALL_KEYS = sorted({key for kind in KINDS.values() for key in kind.keys})
VALUES = st.one_of(st.integers(-3, 300), st.booleans(), st.sampled_from(["relu", "none", "gelu", ""]),
                   st.floats(allow_nan=True), st.lists(st.integers(-1, 40), max_size=5), st.none())
GOOD_SHAPES = st.sampled_from([[3, 32, 32], [16, 8, 8], [64], [12, 32], [3, 5]])
ENTRY = st.builds(lambda kind, fields: {"kind": kind, **fields},
                  st.sampled_from([*LAYER_KINDS, "conv", 3]),
                  st.dictionaries(st.sampled_from([*ALL_KEYS, "repeat", "bias"]), VALUES, max_size=6))


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(ENTRY, min_size=1, max_size=4), shape=st.one_of(st.none(), GOOD_SHAPES, VALUES))
def test_any_layer_tables_give_a_model_or_a_one_line_error(entries, shape):
    data = {"name": "fuzz", "layers": [{k: v for k, v in e.items() if v is not None} for e in entries]}
    if shape is not None:
        data["input_shape"] = shape
    try:
        model = parse_model(data)
    except ModelError as exc:
        assert "\n" not in str(exc)
        return
    for a, b in zip(model.layers, model.layers[1:]):
        assert a.output_shape == b.input_shape
    assert model.params >= 0 and all(x.output_bytes_per_sample > 0 for x in model.layers)
