"""Benchmarks of testpulse (one node, and a cluster against the stock python-socketio cluster).

Run `python -m loadtests.bench --help`; see loadtests/README.md.
"""
