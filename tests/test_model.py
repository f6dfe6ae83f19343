"""Model specs: the fc generator's numbers and TOML loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipesim.model import (
    FLOAT32_BYTES,
    ModelError,
    ModelSpec,
    fc,
    fc_layer,
    load_model,
    parse_model,
)

REPO = Path(__file__).resolve().parents[1]


# --- the fc generator ---------------------------------------------------------


def test_fc_layer_numbers():
    layer = fc_layer(3, 5)
    assert layer.kind == "fc"
    assert (layer.in_features, layer.out_features) == (3, 5)
    assert layer.params == 3 * 5 + 5  # weight + bias
    assert layer.forward_flops_per_sample == 2 * 3 * 5 + 5  # multiply-add + ReLU
    assert layer.output_bytes_per_sample == 5 * 4
    assert layer.saved_bytes_per_sample == 5 * 4
    assert layer.input_bytes_per_sample == 3 * 4


def test_fc_model_numbers():
    model = fc(32, 512)
    assert model.name == "fc32x512"
    assert model.num_layers == 32
    assert model.params == 32 * (512 * 512 + 512) == 8_404_992
    assert model.input_features == model.output_features == 512
    assert all(layer.forward_flops_per_sample == 2 * 512 * 512 + 512 for layer in model.layers)
    assert "8,404,992 params" in model.describe()
    assert "32 fc layers" in model.describe()


def test_fc_custom_name_and_width():
    model = fc(3, 7, name="tiny")
    assert model.name == "tiny"
    assert model.params == 3 * (7 * 7 + 7)
    assert model.layers[0].output_bytes_per_sample == 7 * FLOAT32_BYTES


def test_stage_saved_bytes_counts_the_stage_input_once():
    model = fc(32, 512)
    # stage input (512 floats) + one output per layer
    assert model.stage_saved_bytes(0, 7) == 512 * 4 + 8 * 512 * 4
    assert model.stage_saved_bytes(5, 5) == 2 * 512 * 4


def test_stage_saved_bytes_uneven_widths():
    model = ModelSpec("chain", (fc_layer(8, 16), fc_layer(16, 32), fc_layer(32, 4)))
    assert model.stage_saved_bytes(0, 2) == 8 * 4 + (16 + 32 + 4) * 4
    assert model.stage_saved_bytes(1, 2) == 16 * 4 + (32 + 4) * 4
    assert model.stage_saved_bytes(2, 2) == 32 * 4 + 4 * 4
    assert model.params == (8 * 16 + 16) + (16 * 32 + 32) + (32 * 4 + 4)
    assert "width 4..32" in model.describe()


@pytest.mark.parametrize("call", [lambda: fc(0, 8), lambda: fc(2, 0), lambda: fc_layer(0, 3), lambda: fc_layer(3, 0)])
def test_fc_rejects_non_positive_sizes(call):
    with pytest.raises(ModelError):
        call()


# --- TOML loading -------------------------------------------------------------


def test_load_shipped_fc32():
    model = load_model(REPO / "models" / "fc32.toml")
    assert model.name == "fc32"
    assert model.layers == fc(32, 512).layers
    assert model.params == 8_404_992


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model.toml"
    path.write_text(text)
    return path


def test_load_fc_table(tmp_path):
    model = load_model(write(tmp_path, 'name = "small"\n[fc]\nnum_layers = 3\nwidth = 16\n'))
    assert model.name == "small"
    assert model.layers == fc(3, 16).layers


def test_load_layer_list_with_repeat(tmp_path):
    model = load_model(write(tmp_path, """
name = "funnel"
[[layers]]
kind = "fc"
in_features = 8
out_features = 16
[[layers]]
kind = "fc"
in_features = 16
out_features = 16
repeat = 3
[[layers]]
kind = "fc"
in_features = 16
out_features = 2
"""))
    assert model.name == "funnel"
    assert model.num_layers == 5
    assert [(x.in_features, x.out_features) for x in model.layers] == [
        (8, 16), (16, 16), (16, 16), (16, 16), (16, 2)]
    assert model.input_features == 8 and model.output_features == 2


FC_OK = '[fc]\nnum_layers = 2\nwidth = 4\n'
LAYER = '[[layers]]\nkind = "fc"\nin_features = 4\nout_features = 4\n'


@pytest.mark.parametrize(
    "text, expected",
    [
        # unknown keys
        ('name = "m"\ncolour = "red"\n' + FC_OK, "unknown key 'colour'"),
        ('name = "m"\n[fc]\nnum_layers = 2\nwidth = 4\ndepth = 3\n', "unknown key 'depth'"),
        ('name = "m"\n' + LAYER + 'bias = false\n', "unknown key 'bias'"),
        # missing fields
        (FC_OK, "missing field 'name'"),
        ('name = "m"\n[fc]\nnum_layers = 2\n', "missing field 'width'"),
        ('name = "m"\n[fc]\nwidth = 4\n', "missing field 'num_layers'"),
        ('name = "m"\n[[layers]]\nkind = "fc"\nout_features = 4\n', "missing field 'in_features'"),
        ('name = "m"\n[[layers]]\nkind = "fc"\nin_features = 4\n', "missing field 'out_features'"),
        ('name = "m"\n[[layers]]\nin_features = 4\nout_features = 4\n', "kind must be one of fc"),
        ('name = "m"\n', "exactly one of [fc] or [[layers]]"),
        # bad values
        ('name = "m"\n' + FC_OK + LAYER, "exactly one of [fc] or [[layers]]"),
        ('name = "m"\n[[layers]]\nkind = "conv"\nin_features = 4\nout_features = 4\n', "'conv'"),
        ('name = "m"\n[fc]\nnum_layers = 0\nwidth = 4\n', "'num_layers' must be an integer in 1.."),
        ('name = "m"\n[fc]\nnum_layers = 2\nwidth = 4.5\n', "'width' must be an integer in 1.."),
        ('name = "m"\n[fc]\nnum_layers = true\nwidth = 4\n', "'num_layers' must be an integer in 1.."),
        ('name = "m"\nlayers = []\n', "[[layers]] is empty"),
        ('name = "m"\n[[layers]]\nkind = "fc"\nin_features = 4\nout_features = 8\nrepeat = 2\n',
         "repeat needs in_features == out_features"),
        ('name = "m"\n' + LAYER + "repeat = 0\n", "'repeat' must be an integer in 1.."),
        ('name = "m\n', "not valid TOML"),
    ],
)
def test_bad_toml_is_a_model_error(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message  # one line for the user


def test_layer_chaining_mismatch(tmp_path):
    path = write(tmp_path, """
name = "broken"
[[layers]]
kind = "fc"
in_features = 8
out_features = 16
[[layers]]
kind = "fc"
in_features = 12
out_features = 4
""")
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert "layers[1]" in message
    assert "in_features 12" in message and "out_features 16" in message
    assert str(path) in message


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        load_model(tmp_path / "nope.toml")


def test_parse_model_names_the_source():
    with pytest.raises(ModelError, match=r"^somewhere: missing field 'name'"):
        parse_model({"fc": {"num_layers": 1, "width": 1}}, where="somewhere")


@pytest.mark.parametrize("text", ['name = "m"\nfc = 3\n', 'name = "m"\nlayers = [1, 2]\n'])
def test_wrongly_typed_tables_are_model_errors(tmp_path, text):  # was a TypeError traceback
    with pytest.raises(ModelError):
        load_model(write(tmp_path, text))
