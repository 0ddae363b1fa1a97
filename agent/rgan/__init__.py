"""The RGAN of "Self-recoverable adversarial examples" (arXiv 2204.12050).

config.py   every option, typed         nets.py     G / R / D and their shared blocks
reducer.py  the dimension reducer DR    model.py    protect / recover, model files
keying.py   key → pattern               transforms.py  JPEG and resizes between G and C / R
losses.py   eq. 8–14                    train.py    the joint training loop
evaluate.py held-back metrics           checkpoint.py  resumable training state

Nothing is imported here: the key store and the CLI use `config` and `keying` without paying for
torch at start-up.
"""
