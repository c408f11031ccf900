"""Validation of the budget, the protection policy and the stage config."""

from __future__ import annotations

import pytest

from terse.compress import Budget, CompressorConfig, MessagePolicy, ProtectionPolicy
from terse.errors import ConfigError


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"target_tokens": 10, "rate": 0.5}, {"target_tokens": 0}, {"target_tokens": 2.5}, {"rate": 0.0},
     {"rate": 1.5}, {"rate": float("nan")}, {"target_tokens": True}],
)
def test_bad_budgets_raise_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Budget(**kwargs)  # type: ignore[arg-type]


def test_budget_resolution() -> None:
    assert Budget(target_tokens=50).resolve(1000, 10) == 50
    assert Budget(rate=0.25).resolve(1010, 10) == 10 + 250  # the rate applies to the compressible part
    assert Budget(rate=0.5).resolve(7) == 3
    assert Budget(rate=0.01).resolve(10) == 1


def test_protection_policy_validation() -> None:
    with pytest.raises(ConfigError, match="not a valid regex"):
        ProtectionPolicy(patterns=("([a-z",))
    with pytest.raises(ConfigError, match="tuple of non-empty strings"):
        ProtectionPolicy(literals="Acme")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="non-empty"):
        ProtectionPolicy(literals=("",))
    assert ProtectionPolicy.everything().numbers


def test_compressor_config_validation() -> None:
    with pytest.raises(ConfigError, match="reorder"):
        CompressorConfig(reorder="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="token_pruner"):
        CompressorConfig(token_pruner="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="segment_tokens"):
        CompressorConfig(segment_tokens=2)
    with pytest.raises(ConfigError, match="dynamic_ratio_spread"):
        CompressorConfig(dynamic_ratio_spread=1.5)
    assert CompressorConfig(ranker=None, sentence_ranker="same").resolved_sentence_ranker() == "lm"
    assert CompressorConfig(ranker="embedding", sentence_ranker="same").resolved_sentence_ranker() == "embedding"
    assert CompressorConfig().resolved_sentence_ranker() == "bm25"
    assert CompressorConfig().calls_model()  # the default token pruner scores with the model
    assert not CompressorConfig(token_pruner=None).calls_model()
    assert CompressorConfig(ranker=None, sentence_ranker="same", token_pruner=None).calls_model()  # "same" -> "lm"
    assert not CompressorConfig(ranker="embedding", sentence_ranker="same", token_pruner=None).calls_model()
    with pytest.raises(ConfigError, match="keep_roles"):
        MessagePolicy(Budget(rate=0.5), keep_roles=("boss",))  # type: ignore[arg-type]
