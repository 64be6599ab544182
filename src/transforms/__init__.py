"""Upload transforms: what happens to a client's upload between its training and the server.
Injected faults, attacks (one class each) and DP-FedAvg's clipping (with its noise on the
aggregate), chained in that order (`chain.TransformChain`)."""
