"""Test-session settings: a persistent XLA compilation cache shared by all tests of one session.

Many tests build the same jitted step afresh (a new closure each time, e.g. one per ``train`` call in the
resume tests); the cache turns every repeat compilation into a lookup, which halves the suite on CPU.
"""
import atexit
import functools
import os
import shutil
import tempfile

import jax

_CACHE = os.environ.get("HMDM_TEST_COMPILATION_CACHE")
if _CACHE is None:  # a session's own cache, removed when the session (or xdist worker) ends
    _CACHE = tempfile.mkdtemp(prefix="hmdm_jax_xla_cache_")
    atexit.register(functools.partial(shutil.rmtree, _CACHE, ignore_errors=True))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
