"""Pure rules: what a valid job is, which transitions exist, how outcomes are decided."""
