"""The one error type shown to users, defined with the validation layer in `tuners.validation`."""
from tuners.validation import UserInputError

__all__ = ["UserInputError"]
