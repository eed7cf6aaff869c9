"""moefy: turn a dense LLaMA-family LLM into a standard Mixture-of-Experts checkpoint."""

from moefy.errors import MoefyError

__version__ = "0.1.0"
__all__ = ["MoefyError", "__version__"]
