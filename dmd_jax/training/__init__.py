"""Training: the optimizer with the reference's clipped accumulation (optim.py), the train state
and pure step (state.py), the jitted steps over a device mesh (steps.py), the epoch loop of one
seed (train.py; seeds together: group.py) and what it writes (outputs.py), checkpoints (checkpoints.py), the run config at
the library's edge (run_config.py) and a whole experiment of seeds (experiment.py).
"""
