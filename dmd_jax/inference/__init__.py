"""Prediction on new data from a trained model.

`bundle`: a trained run's best parameters with everything needed to use them (model and text
encoder config, tokenizer files, the input contract, a model card) in one folder that needs no
other path, dataset or network. `inputs`: the files users hand us (JSONL, CSV, npz, MMSA pickles)
read and checked against the contract. `predictor`: `Predictor`, which tokenizes, pads and scores
them with one jitted forward pass per padded batch shape.
"""
