"""Data preparation: MMSA pickles of CMU-MOSI/MOSEI -> sharded TFDS datasets, and a synthetic
MMSA-format generator. The builder and generator are the data issue's work and not here yet."""
