"""Weight conversions into attnlab models: GQA -> MLA (TransMLA), Llama-layout checkpoints.

- :func:`gqa_to_mla`: TransMLA's exact step (per-head-RoPE MLA, same logits, same cache).
- :func:`transmla`: the compression (RoRoPE, FreqFold, BKV-PCA, absorption) to a
  decoupled-RoPE MLA of latent rank d_c that decodes through attnlab's absorbed latent cache.
- :func:`load_llama` / :func:`write_random_llama` / :func:`convert_llama`: Hugging Face
  Llama-layout checkpoints; :func:`llama_forward` is an independent NumPy forward of one.
- :func:`save_model` / :func:`load_model`: any attnlab Transformer as files.

Nothing in attnlab imports this package (only the CLI, experiments and tests); it imports
``attnlab.nn`` and ``attnlab.ops``.
"""

from attnlab.convert._params import build_model, model_params
from attnlab.convert.files import load_model, save_model
from attnlab.convert.gqa_to_mla import check_gqa, exact_config, gqa_to_mla, repeat_matrices
from attnlab.convert.llama import (
    config_from_llama,
    convert_llama,
    load_llama,
    read_config,
    read_weights,
    write_random_llama,
)
from attnlab.convert.llama_reference import llama_forward
from attnlab.convert.transmla import (
    ConversionError,
    calibrate,
    conversion_error,
    rorope_basis,
    transmla,
)

__all__ = ["ConversionError", "build_model", "calibrate", "check_gqa", "config_from_llama",
           "conversion_error", "convert_llama", "exact_config", "gqa_to_mla", "llama_forward",
           "load_llama", "load_model", "model_params", "read_config", "read_weights",
           "repeat_matrices", "rorope_basis", "save_model", "transmla", "write_random_llama"]
