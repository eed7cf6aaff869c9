"""llama.cpp with or without its extra buffer types (AMX on Xeons, repacked weight layouts), kept free of torch so
that the trial process that loads a GGUF first (export/llama_cpp.py) imports it in a fraction of a second."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def without_extra_buffers(llama_cpp):
    """Llama() objects made inside load their weights without llama.cpp's extra buffer types: the kernels every CPU
    has. llama-cpp-python takes no argument for it, so its default model params are swapped for the block. The
    pinned release crashes loading q8_0 or K-quant weights into AMX buffers on some Xeons."""
    bindings = llama_cpp.llama_cpp  # the module Llama() builds its model params from
    default_params = bindings.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    bindings.llama_model_default_params = params
    try:
        yield
    finally:
        bindings.llama_model_default_params = default_params
