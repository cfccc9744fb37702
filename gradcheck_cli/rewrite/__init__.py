"""Model rewrites: the pure maths apart from the torch and ONNX graph plumbing that applies it."""
