"""Certificate material: bundles (load + validate), sources being watched, issuance."""
