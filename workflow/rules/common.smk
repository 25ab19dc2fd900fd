# Shared helpers for the rules: the python module runner and per-tier resources.
def draws(wildcards):
    """Bench draws of this run: known after detection (the tier plan says how many)."""
    tier = checkpoints.detect.get().output.tier
    targets = wl.draw_targets(tier, R, config["arms"])
    if config["sweeps"]:  # capacity sweeps (GPU time): longest sequence and largest batch per arm
        targets += [f"{R}/sweep/{arm}/{kind}.csv" for arm in config["arms"] for kind in ("seq", "batch")]
    return targets
