"""Example flywheel plugins; each module registers one source when flywheel imports it."""
