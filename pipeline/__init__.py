"""metapipe: distributed meta-training on Ray, tracked in MLflow."""
