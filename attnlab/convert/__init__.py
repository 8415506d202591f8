"""Weight conversions into attnlab models: GQA -> MLA (TransMLA), Llama-layout checkpoints.

Nothing in attnlab imports this package (only the CLI, experiments and tests); it imports
``attnlab.nn`` and ``attnlab.ops``.
"""

from attnlab.convert._params import build_model, model_params
from attnlab.convert.gqa_to_mla import check_gqa, exact_config, gqa_to_mla, repeat_matrices
from attnlab.convert.transmla import (
    ConversionError,
    calibrate,
    conversion_error,
    rorope_basis,
    transmla,
)

__all__ = ["ConversionError", "build_model", "calibrate", "check_gqa", "conversion_error",
           "exact_config", "gqa_to_mla", "model_params", "repeat_matrices", "rorope_basis",
           "transmla"]
