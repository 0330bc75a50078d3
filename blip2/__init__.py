"""blip2: BLIP-2 inference — frozen image encoder -> Q-Former -> projection -> frozen LLM.

    import blip2
    model = blip2.load("default")                      # or "Salesforce/blip2-opt-2.7b", or a folder
    model.ask("photo.jpg", "What is in the picture?")
    for chunk in model.stream("photo.jpg", "Describe it."):
        print(chunk, end="")
"""

from .decoding import Decoding
from .errors import Blip2Error, CheckpointError, PrecisionError, PromptTooLongError
from .images import InvalidImageError, load_image
from .loading import load
from .model import Blip2, ModelInfo, Reply, TextStream

__all__ = [
    "Blip2", "Blip2Error", "CheckpointError", "Decoding", "InvalidImageError", "ModelInfo", "PrecisionError",
    "PromptTooLongError", "Reply", "TextStream", "load", "load_image",
]
