"""Embedding: encoders, the Spark job's tasks and driver logic, similarity search."""
