"""Drive what a target built, as a deployment runtime does: embed -> decoder -> head, step by
step, with the cache held the way the target's ``kv_io`` mode wants it (kvplan generate, and
validation's whole-step check)."""
