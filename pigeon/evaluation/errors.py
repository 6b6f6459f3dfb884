"""The evaluation's error base class (torch-free, so the CLI can catch it cheaply)."""


class EvaluationError(ValueError):
    """Evaluation input that cannot be used; the message names the flag, file or value at fault."""
