"""llama.cpp, where most laptop users run models: its own HF -> GGUF converter, and (with the optional
`llama-cpp-python`) its runtime, to score a GGUF beside transformers in one table.

The converter is llama.cpp's `convert_hf_to_gguf.py` with its `conversion/` and `gguf-py/` packages, the copy
vendored in one pinned llama-cpp-python release, so the GGUF we write is the one the runtime we test reads. It comes
from a llama.cpp checkout the user names (MOEFY_LLAMA_CPP), or is fetched once from that release's sdist on PyPI into
the moefy cache."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moefy.errors import MoefyError
from moefy.export.llama_cpp_buffers import without_extra_buffers
from moefy.export.to_gguf import gguf_field
from moefy.sources import cache_dir

LLAMA_CPP_PYTHON = "0.3.36"  # the release whose converter we run and whose runtime the marked tests use
ENV = "MOEFY_LLAMA_CPP"  # a llama.cpp checkout (or any folder holding convert_hf_to_gguf.py and its packages)
SCRIPT = "convert_hf_to_gguf.py"
_MEMBERS = (SCRIPT, "conversion/", "gguf-py/", "LICENSE")


def fetched_dir() -> Path:
    return cache_dir() / f"llama.cpp-convert-{LLAMA_CPP_PYTHON}"


def converter_script() -> Path:
    """The converter to run: MOEFY_LLAMA_CPP if set (and then only that), else the fetched copy, fetched now if
    missing (`moefy fetch-converter` does it ahead, for machines that are offline later)."""
    named = os.environ.get(ENV)
    if named:
        if not (Path(named).expanduser() / SCRIPT).is_file():
            raise MoefyError(f"{ENV}={named} holds no {SCRIPT}; point it at a llama.cpp checkout")
        return Path(named).expanduser() / SCRIPT
    if not (fetched_dir() / SCRIPT).is_file():
        print(f"moefy: fetching llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON} sdist, PyPI) into "
              f"{fetched_dir()}", file=sys.stderr)
    return fetch_converter()


def fetch_converter() -> Path:
    """Download the pinned llama-cpp-python sdist with pip and keep only the converter; idempotent."""
    target = fetched_dir()
    if (target / SCRIPT).is_file():
        return target / SCRIPT
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp,
               f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode or not sdists:
            last = (done.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise MoefyError(f"could not download llama-cpp-python {LLAMA_CPP_PYTHON} from PyPI ({last}); set {ENV} "
                             "to a llama.cpp checkout instead")
        staged = Path(tmp) / "converter"
        with tarfile.open(sdists[0]) as tar:
            root = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            chosen = [m for m in tar.getmembers()
                      if m.name.startswith(root) and m.name[len(root):].startswith(_MEMBERS)]
            for m in chosen:
                m.name = m.name[len(root):]
            tar.extractall(staged, members=chosen, filter="data")
        if not (staged / SCRIPT).is_file():
            raise MoefyError(f"llama-cpp-python {LLAMA_CPP_PYTHON}'s sdist holds no vendor/llama.cpp/{SCRIPT}")
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)
    return target / SCRIPT


def convert(hf_dir: Path, out_file: Path, outtype: str) -> None:
    """Run the converter in this interpreter's environment; its last error line becomes ours."""
    cmd = [sys.executable, str(converter_script()), str(hf_dir), "--outfile", str(out_file), "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode or not out_file.is_file():
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise MoefyError(f"llama.cpp's converter failed on {hf_dir}: {lines[-1] if lines else 'no output'}")


# -- the runtime (optional extra `llama`) --

def require_runtime(purpose: str = "scoring a GGUF"):
    try:
        import llama_cpp
    except ImportError:
        raise MoefyError(f"{purpose} needs llama-cpp-python: pip install 'moefy[llama]' (it compiles llama.cpp, "
                         "about 20 minutes on 2 cores)") from None
    return llama_cpp


# outtype -> llama.cpp file type. The converter writes f32/f16/bf16/q8_0 only; these K-quants (what most GGUFs on the
# hubs are) come from llama.cpp's own quantizer run on its f16 output. They matter for MoEs beyond size: llama.cpp's
# tiled expert kernel takes K-quant weights only (docs/results.md, "llama-cpp-shapes").
QUANTIZED = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
             "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
_QUANTIZE = ("import sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
             "p.ftype = getattr(llama_cpp, sys.argv[3]); "
             "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")


def quantize(src: Path, dst: Path, outtype: str) -> None:
    """llama.cpp's quantizer (llama-quantize's code) on an f16 GGUF, in a child process: its log runs to a line per
    tensor, and a native crash must not end moefy's process. Its last error line becomes ours."""
    done = subprocess.run([sys.executable, "-c", _QUANTIZE, str(src), str(dst), QUANTIZED[outtype]],
                          capture_output=True, text=True)
    if done.returncode or not dst.is_file():
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        how = f"crashed ({signal.Signals(-done.returncode).name})" if done.returncode < 0 else "failed"
        raise MoefyError(f"llama.cpp's quantizer {how} on {src} ({outtype}): {lines[-1] if lines else 'no output'}")


# llama.cpp runs inside moefy's process, where a native crash would end it with no message (this release dies running
# q8_0 or K-quant weights in its AMX buffers on some Xeons, when a batch asks for several positions' logits;
# docs/results.md). So each file first runs a few tokens, every position's logits kept as perplexity keeps them, in
# a child process: with llama.cpp's extra buffer types, and if that crashes, without them. A child killed by a
# signal both ways becomes a one-line error.
_TRIAL = ("import contextlib, sys, llama_cpp\n"
          "from moefy.export.llama_cpp_buffers import without_extra_buffers\n"
          "with contextlib.nullcontext() if sys.argv[2] == 'extra' else without_extra_buffers(llama_cpp):\n"
          "    llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, logits_all=True, verbose=False)\n"
          "llm.eval(llm.tokenize(b'The trial of a GGUF file, run in a child process before it runs in moefy.'))")


def _trial_crash(path: Path, extra_buffers: bool) -> str | None:
    """The signal that killed the trial process, or None if it was not killed."""
    done = subprocess.run([sys.executable, "-c", _TRIAL, str(path), "extra" if extra_buffers else "plain"],
                          capture_output=True, text=True)
    return signal.Signals(-done.returncode).name if done.returncode < 0 else None


def trial_run(path: Path) -> bool:
    """Load and run `path` in a child process first: True if llama.cpp runs it with its extra buffer types, False
    (said on stderr) if only without them; MoefyError if it crashed both ways. Other failures are left to the load
    in this process, which reports them."""
    crash = _trial_crash(path, extra_buffers=True)
    if crash is None:
        return True
    if _trial_crash(path, extra_buffers=False) is None:
        print(f"moefy: llama.cpp crashed ({crash}) running {path} with its extra buffer types (AMX, repacked "
              "layouts) on this CPU; running it without them", file=sys.stderr)
        return False
    raise MoefyError(f"llama.cpp crashed ({crash}) running {path} in a trial process, with and without its extra "
                     "buffer types, so moefy does not run it in its own; this llama-cpp-python build may not support "
                     "the file's tensor types on this CPU: try an f16 GGUF")


@dataclass
class _Output:
    logits: torch.Tensor


class LlamaCppTokenizer:
    """llama.cpp's own tokenizer (from the GGUF) behind the call perplexity uses, so the comparison with transformers
    includes tokenisation."""

    def __init__(self, llm):
        self.llm = llm
        self.eos_token_id = llm.token_eos()

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [self.llm.tokenize(t.encode(), add_bos=add_special_tokens, special=False)
                              for t in texts]}


class LlamaCppLM:
    """A GGUF in llama.cpp behind the small part of the transformers interface that perplexity and speed use:
    `model(input_ids=[batch, seq]).logits` and `generate`. Rows are evaluated one at a time from an empty KV cache.

    extra_buffers: False never uses llama.cpp's extra buffer types (AMX, repacked layouts), as a laptop without them
    runs, and skips the trial process; True uses them where the trial process runs the file with them."""

    def __init__(self, path: Path, n_ctx: int = 2048, threads: int | None = None, extra_buffers: bool = True):
        llama_cpp = require_runtime()
        self.path = Path(path)
        if not self.path.is_file():
            raise MoefyError(f"no such GGUF file: {path}")
        extra_buffers = extra_buffers and trial_run(self.path)
        try:
            with nullcontext() if extra_buffers else without_extra_buffers(llama_cpp):
                self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                                           n_threads=threads or torch.get_num_threads(), n_batch=min(n_ctx, 512))
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            raise MoefyError(f"llama.cpp could not load {path}: {exc}") from None
        # Freed before interpreter shutdown: llama-cpp-python's own __del__ then finds its C functions gone.
        weakref.finalize(self, self.llm.close)
        self.config = type("Config", (), {"vocab_size": self.llm.n_vocab()})()
        self.device = torch.device("cpu")  # llama.cpp takes its ids from CPU memory
        self.tokenizer = LlamaCppTokenizer(self.llm)

    def matmul_params(self) -> tuple[int, int]:
        """(active per token, total) parameters of the decoder blocks, read from the GGUF's tensor table."""
        from gguf import GGUFReader

        reader = GGUFReader(self.path)
        arch = gguf_field(reader, "general.architecture")
        n, k = (gguf_field(reader, f"{arch}.{key}") or 1 for key in ("expert_count", "expert_used_count"))
        total = active = 0
        for t in reader.tensors:
            if t.name.startswith("blk."):
                total += int(t.n_elements)
                active += int(t.n_elements) * (k / n if "_exps." in t.name else 1)
        return int(active), total

    @contextmanager
    def _last_logits_only(self):
        """llama.cpp computes the LM head only at the positions a batch asks logits for; llama-cpp-python asks for
        every position while its (pinned) `_logits_all` is set, as perplexity needs, and for the last one otherwise,
        as generation and llama-bench do."""
        self.llm._logits_all = False
        try:
            yield
        finally:
            self.llm._logits_all = True

    def __call__(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **_) -> _Output:
        """Logits of every position, or of the last one (logits_to_keep=1, transformers' argument: a prefill)."""
        if logits_to_keep not in (0, 1):
            raise ValueError(f"llama.cpp keeps the logits of every position or of the last one, not {logits_to_keep}")
        rows = []
        for row in input_ids.tolist():
            self.llm.reset()
            if logits_to_keep:
                with self._last_logits_only():
                    self.llm.eval(row)
                logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(1, self.llm.n_vocab()))
            else:
                self.llm.eval(row)
                logits = self.llm.scores[: len(row)]
            rows.append(torch.from_numpy(logits.copy()))
        return _Output(torch.stack(rows))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **_) -> list[int]:
        """Greedy decoding of the first row, exactly max_new_tokens steps (what the speed benchmark times). Only the
        last logits of each step are computed, as in any llama.cpp client that samples."""
        out = []
        with self._last_logits_only():
            for tok in self.llm.generate(input_ids[0].tolist(), temp=0.0, top_k=1, reset=True):
                out.append(tok)
                if len(out) == max_new_tokens:
                    break
        return out
