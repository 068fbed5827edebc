"""``python -m loopfast bench``: loopfast side by side with multiprocessing.Pipe and the peers.

runner (the cases, the report, the child processes), peers (what is compared), memory, aio,
pools, accept, floors (the C programs' limits) and plot.
"""
