"""Test set-up: the repository root on sys.path, float64 for the in-process tests.

End-to-end tests run the scripts in subprocesses, in float32 as users do.
"""
import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
jax.config.update('jax_enable_x64', True)
