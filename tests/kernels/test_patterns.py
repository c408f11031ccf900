"""Pattern dataclasses, JSON round trip and the errors a bad file raises."""

from __future__ import annotations

import json

import pytest

from terse.errors import ConfigError
from terse.kernels.patterns import (
    AShapePattern,
    BlockSparsePattern,
    DensePattern,
    ModelPatterns,
    VerticalSlashPattern,
    default_patterns,
    load_or_default,
    load_patterns,
    save_patterns,
)


def sample() -> ModelPatterns:
    layer0 = (DensePattern(), AShapePattern(4, 128), VerticalSlashPattern(64, 32, 0.9), BlockSparsePattern(8, 0.95))
    layer1 = (VerticalSlashPattern(),) * 4
    return ModelPatterns("tiny", 2, 4, (layer0, layer1))


def test_round_trip(tmp_path):
    path = tmp_path / "patterns.json"
    save_patterns(sample(), path)
    assert load_patterns(path) == sample()
    data = json.loads(path.read_text())
    assert data["layers"][0][2] == {"kind": "vertical_slash", "num_vertical": 64, "num_slash": 32, "target_mass": 0.9}


def test_default_and_load_or_default(tmp_path):
    default = load_or_default(tmp_path / "missing.json", "m", 3, 2)
    assert default == default_patterns("m", 3, 2)
    assert all(isinstance(p, VerticalSlashPattern) for layer in default.layers for p in layer)
    save_patterns(sample(), tmp_path / "p.json")
    with pytest.raises(ConfigError, match="re-run the pattern search"):
        load_or_default(tmp_path / "p.json", "tiny", 3, 4)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AShapePattern(window_len=0), "window_len=0"),
        (lambda: VerticalSlashPattern(num_slash=0), "num_slash=0"),
        (lambda: BlockSparsePattern(target_mass=1.5), "target_mass=1.5"),
        (lambda: ModelPatterns("m", 2, 1, ((DensePattern(),),)), "1 layers"),
        (lambda: ModelPatterns("m", 1, 2, ((DensePattern(),),)), "expected num_q_heads=2"),
    ],
)
def test_validation(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot read"),
        ('{"format": "other"}', "expected 'terse.sparse_patterns/1'"),
        ('{"format": "terse.sparse_patterns/1", "model_name": "m", "num_layers": 1, "num_q_heads": 1, '
         '"layers": [[{"kind": "strided"}]]}', "unknown pattern kind 'strided'"),
        ('{"format": "terse.sparse_patterns/1", "model_name": "m", "num_layers": 1, "num_q_heads": 1, '
         '"layers": [[{"kind": "a_shape", "window": 3}]]}', "unknown fields"),
        ('{"format": "terse.sparse_patterns/1", "model_name": "m", "num_layers": 1}', "malformed"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_patterns(path)
