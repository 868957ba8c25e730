"""Built-in trackers: CSV files, TensorBoard, MLflow and Weights & Biases."""
