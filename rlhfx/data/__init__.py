"""Data: tokenizers, dataset builders and input pipelines."""
