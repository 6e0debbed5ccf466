"""Test-session settings: one persistent XLA compilation cache for the whole session.

Many tests build the same jitted step afresh (a new closure each time, e.g. one per ``train`` call in the
resume tests), and every eager op compiles a small program of its own; the cache turns each repeat
compilation into a lookup. The pytest process that starts first creates the folder and exports it through
the environment, so its xdist workers and every script a test runs as a subprocess (which read
``JAX_COMPILATION_CACHE_DIR``) share it; that process removes it when it ends.

The tests' programs are tiny, so XLA's CPU backend compiles them without its expensive LLVM passes
(``TEST_XLA_FLAGS``, exported the same way): compilation, not running, is most of the suite's time.
"""
import atexit
import functools
import os
import shutil
import tempfile

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # before jax creates its CPU backend
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402

_CACHE = os.environ.get("HMDM_TEST_COMPILATION_CACHE")
if _CACHE is None:
    _CACHE = tempfile.mkdtemp(prefix="hmdm_jax_xla_cache_")
    os.environ["HMDM_TEST_COMPILATION_CACHE"] = _CACHE
    atexit.register(functools.partial(shutil.rmtree, _CACHE, ignore_errors=True))
for _name, _value in {"jax_compilation_cache_dir": _CACHE, "jax_persistent_cache_min_compile_time_secs": 0.0,
                      "jax_persistent_cache_min_entry_size_bytes": 0}.items():
    os.environ[_name.upper()] = str(_value)  # for subprocesses: jax reads these at import
    jax.config.update(_name, _value)  # for this process, which imported jax already
