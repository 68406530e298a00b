"""Data for the model: batches in the MMSA layout (batch.py) and the input pipeline from a
prepared dataset to per-process global batches (pipeline.py, grain; imported on use), and
transcripts to word pieces (text.py). Turning
MMSA pickles into prepared datasets is the top-level `data_prep` package.
"""
