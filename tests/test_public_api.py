"""The public API of ``softpatch`` (its ``__init__``) stays the same names, whatever room defines them."""

from __future__ import annotations

import subprocess
import sys

import pytest

import softpatch

PUBLIC = {
    "ConfigError",
    "Embeddings",
    "ScoreResult",
    "SoftPatch",
    "SoftPatchConfig",
    "SoftPatchError",
    "VettingReport",
    "load_bundle",
    "save_bundle",
}


def test_the_public_names_are_the_same_and_each_resolves() -> None:
    assert set(softpatch.__all__) == PUBLIC
    for name in PUBLIC:
        value = getattr(softpatch, name)
        assert value.__name__ == name and value.__module__.startswith("softpatch.")
    from softpatch.method.model import SoftPatch

    assert softpatch.SoftPatch is SoftPatch
    assert issubclass(softpatch.ConfigError, softpatch.SoftPatchError)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="Sampler"):
        softpatch.Sampler  # noqa: B018 - the flat core's old names are gone, not silently aliased


def test_importing_the_package_loads_no_torch() -> None:
    code = "import sys, softpatch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
