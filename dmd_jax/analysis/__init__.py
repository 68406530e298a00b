"""What a trained model shows: the MMSA metrics (metrics.py), the GD-Units' edge matrices with
their statistics, tables and figures (edges.py), and DHMD's dictionary activations
(dictionary.py). Plain numpy and matplotlib on arrays the training or evaluation hands over.
"""
