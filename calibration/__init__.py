"""Calibration core: ONNX-exact quantizers, streaming observers, recipes, one encodings format.

Public API (algorithms never see the pipeline)::

    from calibration import quantize, load_recipe, Encodings
    encodings = quantize(module, "w8a8", forward_loop, component="unet")

See ``docs/calibration.md`` for the scheme table, the encodings format and the commands.
"""

from quant.encodings import Encoding, Encodings, EncodingsError

from .quantize import quantize
from .recipes import Recipe, RecipeError, load_recipe

__all__ = ["Encoding", "Encodings", "EncodingsError", "Recipe", "RecipeError", "load_recipe", "quantize"]
