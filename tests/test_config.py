import pytest

from pasa import PASAConfig


@pytest.mark.parametrize(
    "field,value",
    [
        ("density", 0.0),
        ("density", -0.1),
        ("density", 1.5),
        ("block_size", 100),
        ("group_size", 48),
        ("tile", (2, 8)),
        ("tile", (0, 8, 8)),
        ("temperature", -1.0),
        ("temperature", float("inf")),
        ("selection", "top_q"),
        ("min_blocks", 0),
        ("max_blocks", 0),
        ("seed", -3),
        ("budget", "greedy"),
        ("dense_quantile", 1.0),
        ("min_step_density", 0.9),
        ("backend", "triton-magic"),
    ],
)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"PASAConfig.{field}="):
        PASAConfig(**{field: value})


def test_profile_budget_needs_a_path():
    with pytest.raises(ValueError, match="profile_path"):
        PASAConfig(budget="profile")


def test_defaults_are_valid_and_frozen():
    config = PASAConfig()
    assert config.groups_per_block == 2 and config.local_blocks(0.15, 100) == 11
    with pytest.raises(AttributeError):
        config.density = 0.5  # type: ignore[misc]
    assert config.replace(density=0.5).density == 0.5
    assert PASAConfig(tile=[2, 8, 8]).tile == (2, 8, 8)


def test_provenance_commit_prefers_the_environment(monkeypatch):
    from pasa.provenance import git_commit

    monkeypatch.setenv("PASA_COMMIT", "abc1234")
    assert git_commit() == "abc1234"
    monkeypatch.delenv("PASA_COMMIT")
    commit = git_commit()  # a clone has .git: the HEAD sha; elsewhere it says what to set
    assert len(commit) == 40 or "PASA_COMMIT" in commit
