"""raymoe: train and serve DeepSeek-style Mixture-of-Experts models on Ray."""

__version__ = "0.1.0"
