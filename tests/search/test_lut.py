import json

import numpy as np
import pytest
from torch import nn

import compress
from compress import CompressError
from compress.pruning.prune import prune
from compress.pruning.space import ChannelSpace
from compress.pruning.graph import example_input
from compress.search.latency_table import LatencyTable, _interpolate, _layers, _width
from conftest import run_cli


def test_layer_widths_follow_the_config_exactly():
    """The table's width formulas give each layer's real channel counts in the pruned model."""
    model = compress.build("mobilenet_v3_small_cifar", input_size=16).eval()
    space = ChannelSpace.from_model(model, example_input(16, model))
    layers = _layers(model, space)
    assert [l["name"] for l in layers] == [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for seed in range(3):
        config = space.sample(np.random.default_rng(seed))
        pruned = prune(model, config, space, importance="first")
        for layer in layers:
            m = pruned.get_submodule(layer["name"])
            real_in, real_out = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
            assert (_width(layer["in"], config, space), _width(layer["out"], config, space)) == (real_in, real_out)


def test_interpolation_hits_grid_points_and_is_bilinear_between():
    layer = {"grid_in": [8, 16], "grid_out": [8, 24], "ms": [[1.0, 3.0], [2.0, 6.0]]}
    assert _interpolate(layer, 16, 24) == 6.0 and _interpolate(layer, 8, 8) == 1.0
    assert _interpolate(layer, 12, 16) == pytest.approx((1 + 3 + 2 + 6) / 4)
    assert _interpolate(layer, 4, 4) == 1.0  # clamped outside the grid


def test_lut_cli_builds_fits_and_checks(tmp_path):
    out = run_cli("lut", "mobilenet_v3_small_cifar", "--input-size", "16", "--backend", "onnxruntime", "--grid", "2",
                  "--anchors", "3", "--check", "3", "--runs", "5", "--quiet", "-o", tmp_path / "lut.json")
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "lut.json").read_text())
    assert record["backend"] == "onnxruntime" and len(record["fit"]["anchors"]) == 3
    assert record["check"]["configs"] == 3 and "within +-10%" in out.stdout
    model = compress.build("mobilenet_v3_small_cifar", input_size=16)
    space = ChannelSpace.from_model(model, example_input(16, model))
    table = LatencyTable.load(tmp_path / "lut.json", space)
    assert table.predict(space.max()) > table.predict(space.min()) > 0
    other = ChannelSpace.from_model(model, example_input(16, model), min_ratio=0.5)
    LatencyTable.load(tmp_path / "lut.json", other)  # same groups, other widths: still valid
    v2 = compress.build("mobilenet_v2_cifar", input_size=16)
    with pytest.raises(CompressError, match="another channel space"):
        LatencyTable.load(tmp_path / "lut.json", ChannelSpace.from_model(v2, example_input(16, v2)))
    with pytest.raises(CompressError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        LatencyTable.load(tmp_path / "bad.json", space)
