"""DuanFlow wire contracts: versioned messages, subject names and the error hierarchy."""

from duanflow_proto import codec, errors, messages, subjects

__all__ = ["codec", "errors", "messages", "subjects"]
__version__ = "0.1.0"
