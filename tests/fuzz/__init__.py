"""Hostile-traffic tooling for the tests (issue 11): a grammar-aware SIP mutation
fuzzer (``sipfuzz``, pure and seedable), the loopback runner that sends its cases
and checks the target after every batch (``runner``), and the saved regression
cases (``regressions/``) that every test run replays."""
