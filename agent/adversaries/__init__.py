"""The attacker's side: what someone who wants the original photo back, without the owner's key,
can build from the public code and weights. Each attacker lives in its own module."""
