"""``python -m hmdm_jax.models [num_classes]``: Markdown table of the presets' parameter counts."""
import sys

from .api import param_table

if __name__ == "__main__":
    print(param_table(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
