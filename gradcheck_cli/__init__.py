"""gradcheck: gradient-health diagnostics for saved PyTorch and ONNX models.

The public library API lives in :mod:`gradcheck_cli.api`. Importing this package
imports neither torch nor onnx, so that the CLI's help stays instant.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
