"""The public API: ``import hmdm_jax`` exposes the modules and entry points, every public module declares
``__all__`` and every name in it exists."""
import importlib
import pkgutil

import hmdm_jax


def test_top_level_names_resolve():
    for name in hmdm_jax.__all__:
        assert getattr(hmdm_jax, name) is not None, name
    assert hmdm_jax.preset is hmdm_jax.run.preset and hmdm_jax.TrainState is hmdm_jax.state.TrainState


def test_every_module_declares_all_and_its_names_exist():
    missing = []
    for info in pkgutil.walk_packages(hmdm_jax.__path__, "hmdm_jax."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        if names is None:
            missing.append(info.name)
            continue
        for name in names:
            assert hasattr(module, name), f"{info.name}.__all__ names {name!r}, which it lacks"
    assert not missing, missing
