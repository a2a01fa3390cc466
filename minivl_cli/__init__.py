"""The `minivl` command line: the front end over both packages.

It lives outside `minivl/` because some commands compare or run the torch mirror (`minivl parity`,
`--backend torch`), and the NumPy reference itself never imports torch. Commands that need only
NumPy (`chat`, `perplexity`, `describe-image`, `viz`, `convert`) work without torch installed.
"""
