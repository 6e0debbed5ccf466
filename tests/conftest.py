"""Test-session settings: one persistent XLA compilation cache for the whole session.

Many tests build the same jitted step afresh (a new closure each time, e.g. one per ``train`` call in the
resume tests), and every eager op compiles a small program of its own; the cache turns each repeat
compilation into a lookup. The pytest process that starts first creates the folder and exports it through
the environment, so its xdist workers and every script a test runs as a subprocess (which read
``JAX_COMPILATION_CACHE_DIR``) share it; that process removes it when it ends.
"""
import atexit
import functools
import os
import shutil
import tempfile

import jax

_CACHE = os.environ.get("HMDM_TEST_COMPILATION_CACHE")
if _CACHE is None:
    _CACHE = tempfile.mkdtemp(prefix="hmdm_jax_xla_cache_")
    os.environ["HMDM_TEST_COMPILATION_CACHE"] = _CACHE
    atexit.register(functools.partial(shutil.rmtree, _CACHE, ignore_errors=True))
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
