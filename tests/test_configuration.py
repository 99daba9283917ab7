"""The typed-dataclass machinery shared by every config (ncppo.configuration)."""

from dataclasses import dataclass, field

import pytest

from ncppo.configuration import (
    ConfigError,
    apply,
    check_choice,
    check_type,
    did_you_mean,
    parse_overrides,
    read_mapping,
    updated,
)


@dataclass(frozen=True)
class Inner:
    rate: float = 1.0
    sizes: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class Outer:
    inner: Inner = Inner()
    name: str = "a"
    limit: int | None = None


@dataclass
class Mutable:
    steps: int = 1
    tags: list[str] = field(default_factory=list)


def test_types_are_coerced_or_named():
    assert check_type(2, float, "k") == 2.0 and isinstance(check_type(2, float, "k"), float)
    assert check_type("1e-8", float, "k") == 1e-8
    assert check_type([1, 2], tuple[int, ...], "k") == (1, 2)
    assert check_type(None, int | None, "k") is None
    with pytest.raises(ConfigError, match=r"^k: expected float, got 'abc'$"):
        check_type("abc", float, "k")
    with pytest.raises(ConfigError, match=r"k: expected int, got True"):
        check_type(True, int, "k")
    with pytest.raises(ConfigError, match=r"k\[1\]: expected int"):
        check_type([1, "x"], tuple[int, ...], "k")


def test_updated_returns_a_checked_copy_and_apply_sets_in_place():
    base = Outer()
    new = updated(base, {"inner": {"rate": 3, "sizes": [4]}, "limit": 5}, "cfg")
    assert new == Outer(Inner(3.0, (4,)), "a", 5) and base == Outer()
    with pytest.raises(ConfigError, match=r"cfg.inner: unknown key\(s\) \['rat'\]; did you mean 'rate'\?"):
        updated(base, {"inner": {"rat": 1}}, "cfg")
    with pytest.raises(ConfigError, match=r"cfg.inner.rate: expected float, got 'x'"):
        updated(base, {"inner": {"rate": "x"}}, "cfg")
    m = Mutable()
    apply(m, {"steps": 3, "tags": ["x"]})
    assert (m.steps, m.tags) == (3, ["x"])
    with pytest.raises(ConfigError, match="unknown config key 'step'; did you mean 'steps'"):
        apply(m, {"step": 1})


def test_overrides_choices_and_files(tmp_path):
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d=null", "e="]) == {"a": {"b": 1, "c": ["x", "y"]}, "d": None, "e": ""}
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["a"])
    assert check_choice("dpo", ("dpo", "cpo"), "k") == "dpo"
    with pytest.raises(ConfigError, match="k: 'dpoo' is not one of dpo, cpo; did you mean 'dpo'"):
        check_choice("dpoo", ("dpo", "cpo"), "k")
    assert did_you_mean("zzz", ["dpo"]) == ""
    (tmp_path / "c.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="c.yaml: the config must be a mapping"):
        read_mapping(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("")
    assert read_mapping(tmp_path / "d.yaml") == {}
