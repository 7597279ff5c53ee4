"""prefalign: the preference-alignment stage of LLM post-training in one package."""

__version__ = "0.1.0"

from prefalign.errors import ConfigError, DataError, ModelError, PrefalignError, TrainingError  # noqa: E402

__all__ = ["ConfigError", "DataError", "ModelError", "PrefalignError", "TrainingError", "__version__"]
