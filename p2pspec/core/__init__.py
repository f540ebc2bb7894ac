"""The pure core: the wire's messages, speculative decoding's rules and arithmetic, draft
trees, placement and cost policy, signed records and verdicts, admission counts, config
and errors. No trio, no libp2p, no torch: everything here runs and is tested without a
network or a model (tests/test_layering.py keeps it so)."""
