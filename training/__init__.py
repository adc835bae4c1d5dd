"""Offline side of MetaMMF: data, sampling, training, evaluation and artifact export."""
