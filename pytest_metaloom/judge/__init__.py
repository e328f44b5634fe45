"""Judging: the HTTP workload that observes answers and the oracle that classes them."""
