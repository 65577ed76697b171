"""Property-based tests of configuration parsing: overrides round-trip, type coercion, unknown keys always rejected."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from moelora_ds.config import ConfigError, RunConfig, config_to_dict, load_config

SECTIONS = {name: hint for name, hint in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(hint)}
"""Section name -> its dataclass (model, moelora, optimizer, scheduler, data, train)."""
SCALAR_KEYS = sorted(((section, key, hint) for section, cls in SECTIONS.items()
                      for key, hint in typing.get_type_hints(cls).items()
                      if "list" not in str(hint) and "tuple" not in str(hint)), key=lambda k: k[:2])
"""Every scalar (non-list) key: (section, key, type hint)."""

numbers = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)
plain_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_/.0123456789", min_size=1, max_size=12).filter(
    lambda s: yaml.safe_load(s) == s)


def values_for(hint) -> st.SearchStrategy:
    """Values that are well-typed for `hint` (they may still fail a range check)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is typing.Union:
        return st.one_of(*(st.none() if a is type(None) else values_for(a) for a in args))
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.one_of(st.integers(min_value=-3, max_value=3), st.integers(min_value=-3, max_value=10_000))
    if hint is float:
        return numbers
    if hint is str:
        return plain_text
    raise NotImplementedError(hint)


def override(section: str, key: str, value) -> str:
    return f"--{section}.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def load_or_reject(overrides: list[str], section: str, key: str):
    """The loaded config, or None after checking that the rejection names the key."""
    try:
        return load_config(None, overrides)
    except ConfigError as error:
        assert f"{section}.{key}" in str(error) or "set exactly one of" in str(error), str(error)
        return None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SCALAR_KEYS).flatmap(lambda k: st.tuples(st.just(k), values_for(k[2]))))
def test_a_well_typed_override_round_trips_or_is_rejected_naming_its_key(case):
    (section, key, _), value = case
    config = load_or_reject([override(section, key, value)], section, key)
    if config is not None:
        loaded = getattr(getattr(config, section), key)
        assert loaded == value and type(loaded) is type(value)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(SCALAR_KEYS).flatmap(lambda k: st.tuples(st.just(k), values_for(k[2]))),
                max_size=6, unique_by=lambda case: case[0][:2]))
def test_a_config_file_round_trips(tmp_path, cases):
    overrides = [override(section, key, value) for (section, key, _), value in cases]
    try:
        config = load_config(None, overrides)
    except ConfigError:
        assume(False)
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert config_to_dict(load_config(path)) == config_to_dict(config)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([(s, k) for s, k, h in SCALAR_KEYS if h is int]),
       st.one_of(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)),
                 st.booleans(), plain_text.filter(lambda s: not s.isdigit())))
def test_an_integer_key_never_accepts_a_non_integer(key, value):
    section, name = key
    with pytest.raises(ConfigError, match=rf"{section}\.{name}: expected an integer"):
        load_config(None, [override(section, name, value)])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([(s, k) for s, k, h in SCALAR_KEYS if h is float]), st.integers(1, 10**6),
       st.booleans())
def test_a_float_key_coerces_integers_and_numeric_strings(key, value, as_string):
    section, name = key
    config = load_or_reject([f"--{section}.{name}='{value}'" if as_string else override(section, name, value)],
                            section, name)
    if config is not None:
        loaded = getattr(getattr(config, section), name)
        assert type(loaded) is float and loaded == float(value)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(SECTIONS) + [""]), st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True),
       st.integers(0, 9))
def test_an_unknown_key_is_always_rejected(section, key, value):
    known = set(SECTIONS) | {"deepspeed"} if not section else \
        {f.name for f in dataclasses.fields(SECTIONS[section])}
    assume(key not in known)
    dotted = f"{section}.{key}" if section else key
    with pytest.raises(ConfigError, match=rf"unknown key '{dotted}'"):
        load_config(None, [f"--{dotted}={value}"])
