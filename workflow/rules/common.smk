# Shared helpers for the rules: the python module runner and per-tier resources.
def draws(wildcards):
    """Bench draws of this run: known after detection (the tier plan says how many)."""
    tier = checkpoints.detect.get().output.tier
    return wl.draw_targets(tier, R, config["arms"])
