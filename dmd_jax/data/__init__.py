"""Data for the model: the input pipeline from a prepared dataset to per-process global batches
(pipeline.py, grain; imported on use) and transcripts to word pieces (text.py). The batch layout
the model reads is dmd_jax.model.batch; turning MMSA pickles into prepared datasets is the
top-level `data_prep` package.
"""
