"""The light base every other package stands on: user errors, Hydra composition, shared
constants. It imports no torch, transformers, trl or deepspeed, so login-node commands that
only compose configs or submit jobs stay fast."""
