"""Pigeon: personalized image generation with large multimodal models (arXiv 2410.14170).

Train with `pigeon train`, export with `pigeon export`, serve with `pigeon serve` (Triton). No heavy
imports here: `import pigeon` stays cheap for the Triton Python-backend models.
"""

__version__ = "0.1.0"
